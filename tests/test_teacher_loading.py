"""Any local HF MoE checkpoint loads as a teacher; bad directories fail clearly."""

import json

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ViTConfig,
    ViTModel,
)

from moe2edge.distill.errors import DistillError
from moe2edge.distill.teacher import (
    active_parameters,
    count_parameters,
    inspect_teacher,
    is_placed,
    load_teacher,
    teacher_device,
)
from tests.conftest import PYTHON, ROOT, subprocess_env

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "deepseek_v3": (
        DeepseekV3ForCausalLM,
        DeepseekV3Config(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
        ),
    ),
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_moe_family_loads_as_teacher(family, tmp_path):
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / family)
    teacher = load_teacher(tmp_path / family)
    assert teacher.config.model_type == family
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert active_parameters(teacher) < count_parameters(teacher)
    logits = teacher(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_teacher(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DistillError, match="no config.json"):
        load_teacher(tmp_path)


def test_non_causal_lm_is_refused(tmp_path):
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(DistillError, match="not a causal language model"):
        load_teacher(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(DistillError, match="no weights"):
        load_teacher(tmp_path)


def test_cli_exits_non_zero_with_message_for_missing_teacher(tmp_path):
    import subprocess

    proc = subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", "distill", "inspect-teacher", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _routed_expert_params(config) -> int:
    """Parameters of one routed expert (gate, up, down projections) of the tiny configs above."""
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return 3 * config.hidden_size * width


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inspect_reads_no_weights(family, tmp_path):
    """Sized on the meta device from config.json alone, or with a shard index whose shards are
    absent: the same counts as the real model; active = total - unpicked routed experts."""
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config)
    total, active = count_parameters(model), active_parameters(model)
    unpicked = config.num_hidden_layers * (8 - config.num_experts_per_tok)
    assert total - active == unpicked * _routed_expert_params(config)
    config_only = tmp_path / "config_only"
    config.save_pretrained(config_only)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    for shard in shards:
        shard.unlink()
    for directory in (config_only, sharded):
        info = inspect_teacher(directory)
        assert (info["model_type"], info["params"], info["active_params"]) == (
            family,
            total,
            active,
        )
        assert info["vocab_size"] == 96 and info["quantization"] is None
    with pytest.raises(DistillError, match=f"lists {len(shards)} weight shards .* are missing"):
        load_teacher(sharded)


def test_inspect_teacher_cli_on_a_config_only_checkpoint(tmp_path):
    import subprocess

    FAMILIES["deepseek_v3"][1].save_pretrained(tmp_path)
    proc = subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", "distill", "inspect-teacher", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    model = DeepseekV3ForCausalLM(FAMILIES["deepseek_v3"][1])
    assert info["params"] == count_parameters(model)
    assert info["active_params"] == active_parameters(model) < info["params"]


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    """auto: a bf16 checkpoint loads in bf16 (half of fp32's memory), an fp32 one stays fp32."""
    cls, config = FAMILIES["mixtral"]
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert next(load_teacher(tmp_path / "fp32").parameters()).dtype == torch.float32
    assert next(load_teacher(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    assert next(load_teacher(tmp_path / "bf16", "float32").parameters()).dtype == torch.float32
    assert next(load_teacher(tmp_path / "fp32", "bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(DistillError, match="unknown teacher dtype 'int3'"):
        load_teacher(tmp_path / "fp32", "int3")


def test_device_map_places_the_teacher_with_disk_offload(tmp_path):
    """accelerate places the teacher (CPU RAM + disk here); it answers like the plain load."""
    cls, config = FAMILIES["mixtral"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3, 4]])
    want = load_teacher(tmp_path / "m")(input_ids=ids).logits
    assert not is_placed(load_teacher(tmp_path / "m"))
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    for device_map in ("auto", "cpu", split):
        offload = tmp_path / f"offload-{len(str(device_map))}"
        teacher = load_teacher(tmp_path / "m", device_map=device_map, offload_folder=offload)
        assert is_placed(teacher) and teacher_device(teacher) == torch.device("cpu")
        torch.testing.assert_close(teacher(input_ids=ids).logits, want)
    # Layer 1 stayed on disk (read from the checkpoint's safetensors for each forward).
    assert teacher.hf_device_map["model.layers.1"] == "disk"
    assert {p.device.type for p in teacher.model.layers[1].parameters()} == {"meta"}
    with pytest.raises(DistillError, match="offload_folder needs a device_map"):
        load_teacher(tmp_path / "m", offload_folder=tmp_path / "x")


def test_spread_device_map_is_refused_under_torchrun(tmp_path, monkeypatch):
    cls, config = FAMILIES["mixtral"]
    cls(config).save_pretrained(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistillError, match="under torchrun every rank loads its own"):
        load_teacher(tmp_path, device_map="auto")


FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
       "weight_block_size": [128, 128]}  # fmt: skip


def _fp8_checkpoint(path):
    """DeepSeek-V3's published layout in miniature: its config with an FP8 quantization_config
    (the weights are never read here, so a placeholder file stands for them)."""
    config = FAMILIES["deepseek_v3"][1].to_dict()
    config["quantization_config"] = FP8
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not read")
    return path


def test_fp8_checkpoint_is_refused_without_a_gpu_naming_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _fp8_checkpoint(tmp_path / "fp8")
    with pytest.raises(DistillError) as err:
        load_teacher(path)
    message = str(err.value)
    assert "FP8 block-quantized" in message and "[128, 128]" in message
    assert "moe2edge distill cache --server" in message and "dequantize it to bf16" in message
    info = inspect_teacher(path)  # sizing needs no GPU and no weights
    assert info["quantization"] == {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert info["params"] == count_parameters(DeepseekV3ForCausalLM(FAMILIES["deepseek_v3"][1]))


def test_fp8_checkpoint_on_a_gpu_goes_to_transformers(tmp_path, monkeypatch):
    """On a CUDA GPU (8.9+) the FP8 checkpoint is handed to transformers' FP8 loader, placed on
    the GPUs. Mocked here (no GPU on these machines): what load_teacher passes is checked; the
    real load was not run."""
    import transformers

    path = _fp8_checkpoint(tmp_path / "fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    calls = []

    def fake_from_pretrained(where, **kwargs):
        calls.append(kwargs)
        return OlmoeForCausalLM(FAMILIES["olmoe"][1])

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_from_pretrained)
    )
    monkeypatch.setattr(
        "moe2edge.distill.teacher.add_hook_to_module", lambda *a, **k: None
    )  # no real GPU for the input hook to point at
    load_teacher(path)
    assert calls[-1]["device_map"] == "auto" and calls[-1]["dtype"] == "auto"
    with pytest.raises(DistillError, match="cannot be offloaded"):
        load_teacher(path, device_map="auto", offload_folder=tmp_path / "off")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "A100")
    with pytest.raises(DistillError, match="compute capability 8.9"):
        load_teacher(path)
