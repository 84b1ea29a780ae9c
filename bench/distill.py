"""Distillation benchmark: does distillation beat fine-tuning, and which recipe wins.

On the built-in demo domain (seeded; compound commands, multi-turn context, paraphrased
replies with a real distribution, a held-out split of unseen combinations), against the demo
DeepSeek-V3-architecture MoE teacher, at equal steps and tokens for every row:

  teacher           the teacher's own task accuracy / reply well-formedness (held-out split)
  loss_table        CE only vs each KD loss trained with its recipe (recipes/kd-losses.yaml),
                    per seed: task_acc, reply_wellformed, heldout_kl; mean/min/max over seeds
  on_policy         off-policy vs on-policy GKD (jsd, lambda 0.5) on the compound/long subset
  merged_init       merged MoE->dense init vs random init (same architecture): held-out KL
                    curves, and the steps the merged init needs to reach random's final KL
  sparse_vs_dense   the same fkl run from the top-k=32 cache vs the dense live teacher
  trl               TRL's GKDTrainer vs ours on the same work (bench/distill_trl.py)
  draft_acceptance  a 1-layer draft distilled from the same cache, greedy acceptance rate of
                    4 drafted tokens against the best student
  curves            bench/results/distill_curves.png: held-out KL per method over steps

    python bench/distill.py [--seeds 3] [--steps 300] [--only loss_table,trl,...]
        [--losses ce,fkl] [--transfer-rows 6000] [--label-noise 0.3]

Prints the JSON and writes bench/results/distill.json. CPU only; timings are noisy, so
compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402
from machine import cpu_name  # noqa: E402  (bench/machine.py)
from transformers import AutoModelForCausalLM  # noqa: E402

from moe2edge.distill.cache import build_cache  # noqa: E402
from moe2edge.distill.demo_data import (  # noqa: E402
    corrupt_labels,
    generate_dataset,
    write_demo_data,
    write_jsonl,
)
from moe2edge.distill.evaluate import evaluate_heldout  # noqa: E402
from moe2edge.distill.metrics import read_metrics  # noqa: E402
from moe2edge.distill.pipeline import (  # noqa: E402
    distill_student,
    make_tokenizer,
    merge_teacher_into_dense,
    pretrain_demo_teacher,
)
from moe2edge.distill.student import build_student  # noqa: E402
from moe2edge.distill.teacher import load_teacher  # noqa: E402
from moe2edge.distill.tokenizer import load_tokenizer  # noqa: E402
from moe2edge.distill.train import TrainConfig  # noqa: E402
from moe2edge.fileio import atomic_write_json  # noqa: E402
from moe2edge.rows import read_rows  # noqa: E402

log = logging.getLogger("bench.distill")
RECIPES = ROOT / "recipes" / "kd-losses.yaml"
LOSSES = ("ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd")
MAX_SEQ_LEN = 128  # the demo's; this data set's longest rows are ~85 tokens (768-token BPE)
# the data set of the runs of record in bench/results/distill.json: one earlier turn per
# multi-turn row, a single command after it (the demo's draws more: demo_data)
DATA_VERSION = dict(history_turns=1, compound_after_turn=False)
TRL_RUNS = (
    "trl",
    "ours_live_teacher",
    "ours_cached_teacher",
    "ours_live_teacher_packed",
    "ours_cached_teacher_packed",
)
METRICS = ("task_acc", "reply_wellformed", "heldout_kl", "top1_agreement", "perplexity")


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def run_record(run_dir: Path) -> dict:
    """A finished run's held-out KL curve and training tokens/s, from its metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = [
        (r["step"] + 1, r["heldout_kl"])
        for r in records
        if r.get("split") == "eval" and r.get("heldout_kl") is not None
    ]
    tok_s = [r["tok_s"] for r in records if "tok_s" in r][-1]
    return {"curve": curve, "tok_s": round(tok_s, 1)}


class Bench:
    """The shared pieces (data, tokenizer, teacher, caches) and one scored run."""

    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = write_demo_data(
            self.work / "data", seed=0, train_size=args.train_size, **DATA_VERSION
        )
        self.tokenizer_dir = make_tokenizer(self.data["train"], self.work / "tokenizer", 768)
        self.student_data = self._transfer_set()
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.eval_rows = read_rows(self.data["eval"])[: args.eval_rows]
        self.teacher_dir = self._teacher()
        self.teacher = load_teacher(self.teacher_dir)
        self.base = TrainConfig(
            train_data=str(self.student_data),
            tokenizer=str(self.tokenizer_dir),
            teacher=str(self.teacher_dir),
            student_preset=args.student_preset,
            student_overrides=dict(args.student_overrides),
            batch_size=args.batch_size,
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=10,
            checkpoint_every=0,
            resume="none",
            tensorboard=False,
            plot=False,
            log_every=10,
            eval_data=str(self.data["eval"]),
            eval_every=max(args.steps // 6, 1),
            eval_task_limit=0,  # curves: KL only; the final scoring decodes every row
            max_seq_len=MAX_SEQ_LEN,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )
        self.cache = self._cache(32, self.student_data)
        # held-out curves of every run (live or cached teacher) from one full-vocabulary
        # cache of the eval rows: the exact dense KL, scored the same way for all
        self.base = replace(
            self.base,
            eval_teacher_cache=str(self._cache(len(self.tokenizer), self.data["eval"])),
        )

    def _transfer_set(self) -> Path:
        """The rows the students learn from: the teacher's own training rows (default), or
        ``--transfer-rows`` more rows of the same draw that the teacher never saw, with
        ``--label-noise`` of them mislabelled (``demo_data.corrupt_labels``)."""
        args = self.args
        if not args.transfer_rows and not args.label_noise:
            return self.data["train"]
        rows = read_rows(self.data["train"])
        if args.transfer_rows:
            train, _ = generate_dataset(0, args.train_size + args.transfer_rows, **DATA_VERSION)
            rows = train[args.train_size :]
        out = self.work / "data" / f"transfer-{args.transfer_rows}-noise{args.label_noise}.jsonl"
        write_jsonl(corrupt_labels(rows, args.label_noise, seed=1), out)
        return out

    def _teacher(self) -> Path:
        out = self.work / "teacher_run" / "teacher"
        if (out / "config.json").is_file():
            return out
        cfg = TrainConfig(
            run_dir=str(self.work / "teacher_run"),
            train_data=str(self.data["train"]),
            tokenizer=str(self.tokenizer_dir),
            teacher=None,
            max_steps=self.args.teacher_steps,
            batch_size=32,
            lr=3e-3,
            max_seq_len=MAX_SEQ_LEN,
            checkpoint_every=0,
            resume="none",
            tensorboard=False,
            plot=False,
            log_every=50,
            threads=self.args.threads,
        )
        return pretrain_demo_teacher(cfg)

    def _cache(self, k: int, data: Path) -> Path:
        out = self.work / f"cache-{data.stem}-k{k}"
        if not (out / "index.json").is_file():
            build_cache(
                data=data,
                tokenizer=self.tokenizer_dir,
                out=out,
                teacher=self.teacher_dir,
                k=k,
                max_seq_len=self.base.max_seq_len,
            )
        return out

    def score(self, student_dir: Path, rows: list[dict] | None = None) -> dict:
        """Held-out metrics of a saved student against the live teacher (dense KL)."""
        rows = self.eval_rows if rows is None else rows
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        metrics = evaluate_heldout(
            student,
            self.teacher,
            self.tokenizer,
            rows,
            max_seq_len=self.base.max_seq_len,
            task_limit=len(rows),
            max_new_tokens=self.args.max_new_tokens,
        )
        return {
            k: (None if metrics.get(k) is None else round(float(metrics[k]), 4)) for k in METRICS
        }

    def run(self, name: str, **overrides) -> dict:
        """Train one student with ``overrides`` over the base config; score it."""
        cfg = replace(self.base, run_dir=str(self.work / "runs" / name), **overrides)
        metrics_file = Path(cfg.run_dir) / "metrics.jsonl"
        metrics_file.unlink(missing_ok=True)
        started = time.perf_counter()
        student_dir = distill_student(cfg)
        seconds = time.perf_counter() - started
        record = {"name": name, **self.score(student_dir), "seconds": round(seconds, 1)}
        record.update(run_record(Path(cfg.run_dir)))
        record["student_dir"] = str(student_dir)
        log.warning("%s: %s", name, {k: record[k] for k in METRICS + ("seconds",)})
        return record


@functools.cache
def _recipes() -> dict:
    return yaml.safe_load(RECIPES.read_text())


def recipe_overrides(loss: str) -> dict:
    recipes = _recipes()
    if loss not in recipes:
        raise SystemExit(f"{RECIPES} has no recipe for {loss}")
    return dict(recipes[loss])


def teacher_sources(bench: Bench, recipe: dict) -> dict:
    """The logits from the k = 32 cache; the live teacher stays only for a recipe with
    attention transfer (its maps are not in a cache)."""
    live = recipe.get("attention_weight", 0) > 0
    return {"teacher": bench.base.teacher if live else None, "teacher_cache": str(bench.cache)}


def loss_table(bench: Bench, seeds: list[int]) -> tuple[list[dict], dict]:
    rows, runs = [], {}
    for loss in bench.args.losses.split(","):
        per_seed = []
        for seed in seeds:
            per_seed.append(
                bench.run(
                    f"loss-{loss}-s{seed}",
                    seed=seed,
                    **teacher_sources(bench, recipe_overrides(loss)),
                    **recipe_overrides(loss),
                )
            )
        runs[loss] = per_seed
        rows.append(
            {
                "loss": loss,
                "seeds": seeds,
                "recipe": recipe_overrides(loss),
                **{m: summary([r[m] for r in per_seed]) for m in METRICS},
                "per_seed": {m: [r[m] for r in per_seed] for m in ("task_acc", "heldout_kl")},
                "tok_s": summary([r["tok_s"] for r in per_seed]),
            }
        )
    return rows, runs


def on_policy(bench: Bench, seeds: list[int]) -> dict:
    """GKD off- vs on-policy (lambda 0.5) with the live teacher, scored on the
    compound/long-reply subset of the held-out split."""
    subset = [r for r in bench.eval_rows if r.get("kind") == "compound" or r.get("long")]
    out = {"subset_rows": len(subset)}
    for mode, extra in (("off_policy", {}), ("on_policy", {"lambda_on_policy": 0.5})):
        scores = []
        for seed in seeds:
            record = bench.run(
                f"gkd-{mode}-s{seed}", seed=seed, mode=mode, **recipe_overrides("jsd"), **extra
            )
            scores.append(bench.score(Path(record["student_dir"]), subset))
        out[mode] = {m: summary([s[m] for s in scores]) for m in METRICS}
    return out


def merged_init(bench: Bench) -> dict:
    """Same architecture (the merged model's), same recipe: merged init vs random init."""
    merged = merge_teacher_into_dense(
        bench.teacher_dir, bench.tokenizer_dir, bench.data["train"], bench.work / "merged"
    )
    config = json.loads((merged / "config.json").read_text())
    shape = {
        k: config[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    recipe = recipe_overrides("fkl")
    common = dict(**teacher_sources(bench, recipe), **recipe)
    random_init = bench.run(
        "init-random", student_preset="demo", student_overrides={**shape}, **common
    )
    merged_run = bench.run("init-merged", student_init=str(merged), student_overrides={}, **common)
    target = random_init["curve"][-1][1]
    reached = next((step for step, kl in merged_run["curve"] if kl <= target), None)
    return {
        "architecture": shape,
        "random_final_kl": target,
        "merged_final_kl": merged_run["curve"][-1][1],
        "merged_steps_to_random_final_kl": reached,
        "steps": bench.base.max_steps,
        "random_curve": random_init["curve"],
        "merged_curve": merged_run["curve"],
    }


def sparse_vs_dense(bench: Bench) -> dict:
    recipe = recipe_overrides("fkl")
    dense = bench.run("fkl-dense-live", **recipe)
    sparse = bench.run("fkl-sparse-k32", **teacher_sources(bench, recipe), **recipe)
    return {
        "dense_kl": dense["heldout_kl"],
        "sparse_k32_kl": sparse["heldout_kl"],
        "relative_gap": round(
            abs(sparse["heldout_kl"] - dense["heldout_kl"]) / dense["heldout_kl"], 4
        ),
        "dense_tok_s": dense["tok_s"],
        "sparse_tok_s": sparse["tok_s"],
    }


def trl_side_by_side(bench: Bench, seeds: list[int]) -> dict:
    """TRL's GKDTrainer and ours, per seed: the same init, data, batch, steps, divergence.

    One seed moved TRL's held-out KL from 1.10 to 1.38 between two machines, more than the
    gap measured between the two trainers, so each seed gives one init to all five runs
    (and is each trainer's own data-order seed), and the ratios are of the means."""
    runs: dict[str, list[dict]] = {name: [] for name in TRL_RUNS}
    for seed in seeds:
        for name, record in trl_seed(bench, seed).items():
            runs[name].append(record)
    out: dict = {
        "work": "jsd beta 0.5, T 1, off-policy (lmbda 0), same init/data/batch/steps/optimizer",
        "seeds": seeds,
    }
    for name, records in runs.items():
        out[name] = {m: summary([r[m] for r in records]) for m in ("tok_s", *METRICS)}
        out[name]["per_seed_heldout_kl"] = [r["heldout_kl"] for r in records]

    def ratio(a: str, b: str, metric: str) -> float:
        return round(out[a][metric]["mean"] / out[b][metric]["mean"], 3)

    for name in TRL_RUNS[1:]:  # ours_live_teacher_packed -> tok_s_ratio_live_packed, ...
        short = name.removeprefix("ours_").replace("_teacher", "")
        out[f"tok_s_ratio_{short}"] = ratio(name, "trl", "tok_s")
        out[f"kl_ratio_{short}"] = ratio(name, "trl", "heldout_kl")
    return out


def trl_seed(bench: Bench, seed: int) -> dict[str, dict]:
    """One seed of the side by side: a record per ``TRL_RUNS`` name. Ours runs padded, as
    TRL's collator does, and packed (``packing=true``: the same examples end to end in rows
    of ``max_seq_len``, attention within each; TRL's GKD skips the dataset preparation
    where SFT would pack), each with the live teacher and from the k = 32 cache."""
    from distill_trl import run_trl_gkd

    init_dir = bench.work / f"trl-init-s{seed}"
    student = build_student(
        bench.base.student_preset,
        len(bench.tokenizer),
        seed=seed,
        **bench.base.student_overrides,
    )
    student.generation_config.eos_token_id = bench.tokenizer.eos_token_id
    student.save_pretrained(init_dir)
    bench.tokenizer.save_pretrained(init_dir)
    work = dict(loss="jsd", beta=0.5, temperature=1.0, ce_ratio=0.0, ce_warmup_steps=0)
    work["attention_weight"] = 0.0  # TRL's GKD has no attention transfer
    work.update(eval_data=None, eval_every=0, seed=seed)  # no held-out passes when timed
    sources = {"live": {}, "cached": {"teacher": None, "teacher_cache": str(bench.cache)}}
    pick = ("tok_s", *METRICS)
    records = {}
    for packing in (False, True):  # packed: rows end to end, fewer pads (TRL's GKD pads)
        for source, teacher in sources.items():
            tail = "-packed" if packing else ""
            run = bench.run(
                f"trl-match-ours-{source}{tail}-s{seed}",
                student_init=str(init_dir),
                student_overrides={},
                packing=packing,
                **teacher,
                **work,
            )
            records[f"ours_{source}_teacher{tail.replace('-', '_')}"] = {m: run[m] for m in pick}
    b = bench.base
    trl = run_trl_gkd(
        init_dir,
        bench.teacher,
        bench.tokenizer,
        read_rows(b.train_data),
        bench.work / "runs" / f"trl-gkd-s{seed}",
        steps=b.max_steps,
        batch_size=b.batch_size,
        lr=b.lr,
        warmup_steps=b.warmup_steps,
        weight_decay=b.weight_decay,
        grad_clip=b.grad_clip,
        max_seq_len=b.max_seq_len,
        beta=0.5,
        seed=seed,
        threads=b.threads,
    )
    return {"trl": {"tok_s": trl["tok_s"], **bench.score(Path(trl["student_dir"]))}, **records}


def draft_acceptance(bench: Bench, best: dict) -> dict:
    """A 1-layer draft from the same k=32 cache, against the best student (greedy, 4 tokens)."""
    from moe2edge.distill.data import encode_rows, prompt_part
    from moe2edge.distill.draft import DraftConfig, acceptance_rate, train_draft

    fields = {f: getattr(bench.base, f) for f in bench.base.__dataclass_fields__}
    cfg = DraftConfig(
        **{
            **fields,
            **recipe_overrides("fkl"),
            "run_dir": str(bench.work / "runs" / "draft"),
            "student_preset": "draft",
            "student_overrides": {},
            "teacher": None,
            "teacher_cache": str(bench.cache),
            "attention_weight": 0.0,  # the logits only: a draft learns what to say next
            "max_steps": bench.args.draft_steps,
        },
        draft_for=best["student_dir"],
    )
    (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
    draft_dir = train_draft(cfg)
    target = AutoModelForCausalLM.from_pretrained(best["student_dir"], dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    rows = bench.eval_rows[: bench.args.draft_prompts]
    prompts = [prompt_part(e) for e in encode_rows(bench.tokenizer, rows, bench.base.max_seq_len)]
    rate = acceptance_rate(
        target,
        draft,
        prompts,
        draft_tokens=4,
        max_new_tokens=bench.args.max_new_tokens,
        eos_token_ids=[bench.tokenizer.eos_token_id],
    )
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "rate": round(rate, 4),
        "draft_tokens": 4,
        "prompts": len(prompts),
        "target": best["name"],
        "draft_params": params(draft),
        "target_params": params(target),
        "draft_steps": cfg.max_steps,
    }


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Held-out KL per method (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [s for s, _ in runs[0]["curve"]]
    return [(s, statistics.fmean(r["curve"][i][1] for r in runs)) for i, s in enumerate(steps)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-distill")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument(
        "--transfer-rows",
        type=int,
        default=0,
        help="students learn from this many rows the teacher never saw (0: the teacher's rows)",
    )
    parser.add_argument(
        "--label-noise", type=float, default=0.0, help="share of student rows mislabelled"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--student-preset", default="demo")
    parser.add_argument("--student-overrides", type=yaml.safe_load, default={})
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--draft-steps", type=int, default=300)
    parser.add_argument("--draft-prompts", type=int, default=60)
    parser.add_argument("--only", default="", help="comma list of sections to run")
    parser.add_argument("--losses", default=",".join(LOSSES), help="loss_table rows to train")
    parser.add_argument("--json", default=str(ROOT / "bench/results/distill.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    bench = Bench(args)
    seeds = list(range(args.seeds))
    sections = set(filter(None, args.only.split(","))) or {
        "loss_table",
        "on_policy",
        "merged_init",
        "sparse_vs_dense",
        "trl",
        "draft",
    }
    result: dict = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    result.update(steps=args.steps, batch_size=args.batch_size)
    result["teacher"] = bench.score(bench.teacher_dir)
    log.warning("teacher: %s", result["teacher"])
    curves = {}

    def save(complete: bool = False) -> None:
        atomic_write_json(args.json, {**result, "complete": complete})

    if "loss_table" in sections:
        result["loss_table"], runs = loss_table(bench, seeds)
        curves.update({loss: mean_curve(r) for loss, r in runs.items()})
        save()
    if "on_policy" in sections:
        result["on_policy"] = on_policy(bench, seeds)
        save()
    if "merged_init" in sections:
        result["merged_init"] = merged_init(bench)
        curves["merged init (fkl)"] = result["merged_init"]["merged_curve"]
        curves["random init (fkl)"] = result["merged_init"]["random_curve"]
        save()
    if "sparse_vs_dense" in sections:
        result["sparse_vs_dense"] = sparse_vs_dense(bench)
        save()
    if "trl" in sections:
        result["trl"] = trl_side_by_side(bench, seeds)
        save()
    if "draft" in sections and "loss_table" in sections:
        best = min(
            (r for loss, rs in runs.items() if loss != "ce" for r in rs),
            key=lambda r: (-(r["task_acc"] or 0), r["heldout_kl"]),
        )
        result["draft_acceptance"] = draft_acceptance(bench, best)
        save()
    if curves:
        png = Path(args.json).with_name("distill_curves.png")
        plot(curves, png)
        result["curves_png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    save(complete=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
