"""``moe2edge demo``: the whole pipeline on the built-in tiny models, with a report.

data -> tokenizer -> teacher (DEMO ONLY: a tiny DeepSeek-V3 pre-trained here) ->
distillation (and, beside it, a CE-only student: the same student, steps and data, learning
from the reference replies alone, so the report shows what the teacher adds) -> FP32 ONNX
bundle -> parity -> runtime evaluation. Writes
``RUN_DIR/report.json`` and ``RUN_DIR/report.md``. Settings: recipes/demo.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from moe2edge.rows import read_rows

log = logging.getLogger("moe2edge.demo")


@dataclass
class DemoConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    train_size: int = 6000
    eval_size: int = 200
    history_turns: int = 2  # the most earlier turns of a multi-turn row (demo_data.HISTORY_TURNS)
    vocab_size: int = 768  # a chat after two earlier turns is then ~98 tokens (at most 162)
    batch_size: int = 32
    teacher_steps: int = 2000
    teacher_lr: float = 3e-3
    student_preset: str = "demo"
    student_steps: int = 600
    student_lr: float = 3e-3
    loss: str = "fkl"
    temperature: float = 1.0
    ce_ratio: float = 0.5
    attention_weight: float = 1.0  # attention transfer (distill/attention_transfer.py)
    ce_baseline: bool = True  # also train the CE-only student (fine-tuning) for comparison
    max_new_tokens: int = 64
    max_seq_len: int = 128


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML (default: recipes/demo.yaml if present)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(handler=run)


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        log.info("== stage: %s", name)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)


def run_demo(cfg: DemoConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.demo_domain import is_wellformed
    from moe2edge.distill.evaluate import evaluate_model, reply_wellformed, task_accuracy
    from moe2edge.distill.pipeline import distill_student, make_tokenizer, pretrain_demo_teacher
    from moe2edge.distill.teacher import active_parameters, count_parameters, load_teacher
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.distill.train import TrainConfig
    from moe2edge.export.onnx_export import export_fp32
    from moe2edge.export.pipeline import parity_for_bundle
    from moe2edge.export.variants import build_all_variants
    from moe2edge.runtime.generate import Generator

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = StageTimer()
    with stage("data"):
        paths = write_demo_data(
            run_dir / "data",
            cfg.seed,
            cfg.train_size,
            cfg.eval_size,
            history_turns=cfg.history_turns,
        )
        eval_rows = read_rows(paths["eval"])
    with stage("tokenizer"):
        make_tokenizer(paths["train"], run_dir / "tokenizer", cfg.vocab_size)
    common = dict(
        train_data=str(paths["train"]),
        tokenizer=str(run_dir / "tokenizer"),
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        checkpoint_every=0,
    )
    with stage("teacher"):
        teacher_dir = pretrain_demo_teacher(
            TrainConfig(
                run_dir=str(run_dir / "teacher_run"),
                teacher=None,
                max_steps=cfg.teacher_steps,
                lr=cfg.teacher_lr,
                **common,
            )
        )
    with stage("distill"):
        student_dir = distill_student(
            TrainConfig(
                run_dir=str(run_dir / "student_run"),
                teacher=str(teacher_dir),
                student_preset=cfg.student_preset,
                max_steps=cfg.student_steps,
                lr=cfg.student_lr,
                loss=cfg.loss,
                temperature=cfg.temperature,
                ce_ratio=cfg.ce_ratio,
                attention_weight=cfg.attention_weight,
                **common,
            )
        )
    ce_dir = None
    if cfg.ce_baseline:
        with stage("ce_baseline"):
            ce_dir = distill_student(
                TrainConfig(
                    run_dir=str(run_dir / "ce_student_run"),
                    teacher=str(teacher_dir),  # loaded, never asked: ce_ratio 1 is CE only
                    student_preset=cfg.student_preset,
                    max_steps=cfg.student_steps,
                    lr=cfg.student_lr,
                    ce_ratio=1.0,
                    **common,
                )
            )
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    with stage("evaluate_pytorch"):
        teacher = load_teacher(teacher_dir)
        student = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True)
        teacher_eval = evaluate_model(
            teacher, tokenizer, eval_rows, cfg.max_new_tokens, "teacher eval"
        )
        student_eval = evaluate_model(
            student, tokenizer, eval_rows, cfg.max_new_tokens, "student eval"
        )
        ce_eval = None
        if ce_dir is not None:
            ce_student = AutoModelForCausalLM.from_pretrained(ce_dir, local_files_only=True)
            ce_eval = evaluate_model(
                ce_student, tokenizer, eval_rows, cfg.max_new_tokens, "CE-only student eval"
            )
    bundle_dir = run_dir / "bundles" / "fp32"
    with stage("export"):
        export_fp32(student_dir, bundle_dir, cfg.max_new_tokens, overwrite=True)
    with stage("parity"):
        parity = parity_for_bundle(student_dir, bundle_dir, paths["eval"], limit=None)
    with stage("runtime_eval"):
        generator = Generator.from_bundle(bundle_dir)
        # a multi-turn row's prompt is the whole chat so far, in the demo's chat format
        results = [
            generator.generate(r["prompt"], template=False)
            if "messages" in r
            else generator.generate(r["utterance"])
            for r in eval_rows
        ]
        onnx_texts = [r.text for r in results]
        decode_ms = sum(r.decode_ms for r in results)
        decode_tokens = sum(max(0, len(r.token_ids) - 1) for r in results)
    with stage("export_variants"):  # every precision, both targets, scored against FP32
        variants = build_all_variants(
            bundle_dir,
            paths["eval"],
            run_dir / "bundles",
            calibration_jsonl=paths["train"],
            reply_check=is_wellformed,
        )
        (run_dir / "export-report.json").write_text(json.dumps(variants, indent=2) + "\n")
    report = {
        "teacher_params": count_parameters(teacher),
        "teacher_active_params": active_parameters(teacher),
        "student_params": count_parameters(student),
        "teacher_task_acc": teacher_eval["task_acc"],
        "student_task_acc": student_eval["task_acc"],
        "ce_student_task_acc": ce_eval["task_acc"] if ce_eval else None,
        "onnx_task_acc": task_accuracy(onnx_texts, eval_rows),
        "teacher_reply_wellformed": teacher_eval["reply_wellformed"],
        "student_reply_wellformed": student_eval["reply_wellformed"],
        "ce_student_reply_wellformed": ce_eval["reply_wellformed"] if ce_eval else None,
        "onnx_reply_wellformed": reply_wellformed(onnx_texts, eval_rows),
        "subsets": eval_subsets(
            eval_rows,
            {
                "teacher": teacher_eval["texts"],
                "student": student_eval["texts"],
                **({"ce_student": ce_eval["texts"]} if ce_eval else {}),
                "onnx": onnx_texts,
            },
        ),
        "parity_max_abs_logit_diff": parity["max_abs_logit_diff"],
        "greedy_match_rate": parity["greedy_match_rate"],
        "ttft_ms_p50": statistics.median(r.ttft_ms for r in results),
        "decode_tok_s": decode_tokens / (decode_ms / 1000) if decode_ms else 0.0,
        "eval_prompts": len(eval_rows),
        "stage_seconds": stage.seconds,
        "total_seconds": round(sum(stage.seconds.values()), 2),
        "config": asdict(cfg),
        "artifacts": {
            "teacher": str(teacher_dir),
            "student": str(student_dir),
            "ce_student": str(ce_dir) if ce_dir else None,
            "bundle_fp32": str(bundle_dir),
            "grammar": str(paths["grammar"]),
            "export_report": str(run_dir / "export-report.json"),
        },
        "variants": [
            {
                k: v[k]
                for k in (
                    "bundle",
                    "target",
                    "precision",
                    "method",
                    "weight_bytes",
                    "top1_agreement",
                    "task_acc",
                    "reply_wellformed",
                )
                if k in v
            }
            for v in variants
        ],
        "examples": [
            {"utterance": r["utterance"], "expected": r["action"], "onnx_reply": res.text}
            for r, res in list(zip(eval_rows, results, strict=True))[:5]
        ],
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "report.md").write_text(render_markdown(report))
    return report


def eval_subsets(rows: list[dict], replies: dict[str, list[str]]) -> dict:
    """Task accuracy and reply well-formedness per model on the eval rows' subsets: every
    row, each ``kind`` (single, compound, multi_turn) and the long replies."""
    from moe2edge.distill.evaluate import reply_wellformed, task_accuracy

    tests = {"all": lambda r: True, "long": lambda r: bool(r.get("long"))}
    for kind in sorted({r["kind"] for r in rows if "kind" in r}):
        tests[kind] = lambda r, kind=kind: r.get("kind") == kind
    subsets = {}
    for name, keep in tests.items():
        picked = [i for i, r in enumerate(rows) if keep(r)]
        if not picked:
            continue
        sub = [rows[i] for i in picked]
        models = {}
        for model, texts in replies.items():
            chosen = [texts[i] for i in picked]
            models[model] = {
                "task_acc": task_accuracy(chosen, sub),
                "reply_wellformed": reply_wellformed(chosen, sub),
            }
        subsets[name] = {"rows": len(picked), "models": models}
    return subsets


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_markdown(report: dict) -> str:
    lines = [
        "# moe2edge demo report",
        "",
        "The teacher is a tiny DeepSeek-V3 pre-trained on the built-in demo data (DEMO ONLY); "
        "accuracies are on held-out (intent, room) combinations and compound pairings never "
        "seen in training. task_acc: the whole action sequence exact; reply_wellformed: the "
        "spoken reply is a proper confirmation of the reply's own actions.",
        "",
        "| model | parameters | task acc | reply well-formed |",
        "|---|---|---|---|",
        f"| teacher (MoE) | {report['teacher_params']:,} ({report['teacher_active_params']:,} "
        f"active) | {_fmt(report['teacher_task_acc'])} | "
        f"{_fmt(report['teacher_reply_wellformed'])} |",
        f"| KD student | {report['student_params']:,} | {_fmt(report['student_task_acc'])} | "
        f"{_fmt(report['student_reply_wellformed'])} |",
        f"| CE-only student | {report['student_params']:,} | "
        f"{_fmt(report.get('ce_student_task_acc'))} | "
        f"{_fmt(report.get('ce_student_reply_wellformed'))} |",
        f"| KD student, ONNX Runtime | | {_fmt(report['onnx_task_acc'])} | "
        f"{_fmt(report['onnx_reply_wellformed'])} |",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in report.items():
        if isinstance(value, (int, float)):
            lines.append(
                f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value:,} |"
            )
    lines += [
        "",
        "| subset | rows | model | task acc | reply well-formed |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['rows']} | {model} | {m['task_acc']:.3f} | {m['reply_wellformed']:.3f} |"
        for name, s in report["subsets"].items()
        for model, m in s["models"].items()
    ]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["stage_seconds"].items()]
    lines += [
        "",
        "Bundles (scored against FP32 on the held-out prompts; full table in export-report.json):",
        "",
        "| bundle | target | precision | method | weight bytes | top-1 | task acc | well-formed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {v['bundle']} | {v['target']} | {v['precision']} | {v['method']} | "
        f"{v['weight_bytes']:,} | {v['top1_agreement']:.4f} | {v['task_acc']:.3f} | "
        f"{_fmt(v.get('reply_wellformed'))} |"
        for v in report["variants"]
    ]
    lines += ["", "Examples (ONNX Runtime, greedy):", ""]
    lines += [
        f"- `{e['utterance']}` -> `{e['onnx_reply']}` (expected `{e['expected']}`)"
        for e in report["examples"]
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from moe2edge.distill.config import load_config

    config_path = args.config
    if config_path is None and Path("recipes/demo.yaml").is_file():
        config_path = "recipes/demo.yaml"
    report = run_demo(load_config(DemoConfig, config_path, args.overrides))
    keys = [
        "teacher_task_acc",
        "student_task_acc",
        "onnx_task_acc",
        "student_reply_wellformed",
        "onnx_reply_wellformed",
        "parity_max_abs_logit_diff",
        "greedy_match_rate",
        "ttft_ms_p50",
        "decode_tok_s",
        "total_seconds",
    ]
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    return 0
