"""Every stage on tiny models, joined end to end (see the tiny_run fixture)."""

import json
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe2edge.distill.config import load_config
from moe2edge.distill.errors import DistillError
from moe2edge.distill.pipeline import distill_student, make_tokenizer
from moe2edge.distill.train import TrainConfig
from moe2edge.export.bundle import describe_io
from moe2edge.export.parity import check_parity
from moe2edge.export.pipeline import read_prompts
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from tests.conftest import PYTHON, ROOT, subprocess_env


def run_cli(*args, timeout=300):
    return subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=timeout,
    )


def test_student_is_a_standard_hf_checkpoint(tiny_run):
    student = tiny_run["student"]
    assert (student / "model.safetensors").is_file() and (student / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.model_type == "llama"
    metrics = [
        json.loads(x)
        for x in (tiny_run["root"] / "student_run/metrics.jsonl").read_text().splitlines()
    ]
    assert metrics and all({"loss", "kd", "ce", "lr", "grad_norm"} <= set(m) for m in metrics)
    assert all(m["kd"] > 0 for m in metrics)  # the teacher's logits were used


def test_bundle_manifest_describes_io_precision_hashes_and_generation(tiny_run):
    manifest = verify_bundle(tiny_run["bundle"])
    assert manifest["format_version"] == 2 and len(manifest["checksum"]) == 64
    assert manifest["precision"]["weights"] == "fp32"
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json", "config.json"}
    kv = manifest["io"]["kv_cache"]
    names = {e["name"] for e in manifest["io"]["inputs"]}
    assert {kv["past_key"].format(layer=i) for i in range(kv["num_layers"])} <= names
    assert manifest["io"] == {**manifest["io"], **describe_io(tiny_run["bundle"] / "model.onnx")}
    assert manifest["generation"]["prompt_template"] == "<|user|> {prompt} <|assistant|>"


def test_parity_pytorch_vs_onnxruntime(tiny_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_run["student"])
    generator = Generator.from_bundle(tiny_run["bundle"])
    result = check_parity(model, generator, read_prompts(tiny_run["eval"]), max_new_tokens=12)
    assert result["max_abs_logit_diff"] <= 1e-3
    assert result["greedy_match_rate"] == 1.0


def test_parity_detects_a_different_model(tiny_run, tmp_path):
    """The check can fail: perturbing the PyTorch weights breaks parity."""
    model = AutoModelForCausalLM.from_pretrained(tiny_run["student"])
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    generator = Generator.from_bundle(tiny_run["bundle"])
    result = check_parity(model, generator, read_prompts(tiny_run["eval"])[:3], max_new_tokens=8)
    assert result["max_abs_logit_diff"] > 1e-2


def test_generate_cli_streams_the_reply(tiny_run):
    proc = run_cli("generate", tiny_run["bundle"], "turn on the kitchen lights", "--stats")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["prompt_tokens"] > 3 and stats["new_tokens"] >= 1
    expected = Generator.from_bundle(tiny_run["bundle"]).generate("turn on the kitchen lights").text
    assert proc.stdout.strip() == expected.strip()


def test_tampered_bundle_is_refused(tiny_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run["bundle"], bundle)
    data = bytearray((bundle / "tokenizer.json").read_bytes())
    data[100] ^= 1
    (bundle / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tokenizer.json: sha256 differs"):
        Generator.from_bundle(bundle)
    proc = run_cli("generate", bundle, "hello")
    assert proc.returncode == 2 and "changed after export" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_truncated_and_missing_files_are_named(tiny_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run["bundle"], bundle)
    model = bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    (bundle / "config.json").unlink()
    with pytest.raises(
        BundleError, match=r"config.json: missing.*model.onnx: 1000 bytes.*truncated"
    ):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="not a moe2edge bundle"):
        read_manifest(tmp_path)


def test_export_verify_cli(tiny_run):
    proc = run_cli("export", "verify", tiny_run["bundle"])
    assert proc.returncode == 0 and "io contract ok" in proc.stdout


def test_tokenizer_that_does_not_match_the_teacher(tiny_run, tmp_path):
    make_tokenizer(tiny_run["train"], tmp_path / "big_tok", vocab_size=600)
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        train_data=str(tiny_run["train"]),
        tokenizer=str(tmp_path / "big_tok"),
        teacher=str(tiny_run["teacher"]),
        student_preset="tiny",
        max_steps=1,
    )
    with pytest.raises(DistillError, match="do not belong together"):
        distill_student(cfg)
    proc = run_cli(
        "distill",
        "train",
        f"run_dir={tmp_path / 'run2'}",
        f"train_data={tiny_run['train']}",
        f"tokenizer={tmp_path / 'big_tok'}",
        f"teacher={tiny_run['teacher']}",
        "student_preset=tiny",
        "max_steps=1",
    )
    assert proc.returncode == 2 and "do not belong together" in proc.stderr


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("loss: rkl\nmax_steps: 7\nteacher: null\n")
    cfg = load_config(TrainConfig, path, ["max_steps=9", "temperature=1.5", "student_init=none"])
    assert (cfg.loss, cfg.max_steps, cfg.temperature, cfg.teacher) == ("rkl", 9, 1.5, None)
    with pytest.raises(DistillError, match="unknown config keys"):
        path.write_text("nonsense: 1\n")
        load_config(TrainConfig, path)
    with pytest.raises(DistillError, match="bad override"):
        load_config(TrainConfig, None, ["max_steps"])
    with pytest.raises(DistillError, match="bad value for max_steps"):
        load_config(TrainConfig, None, ["max_steps=abc"])
