"""The shipped FSDP2 and DeepSpeed ZeRO configs, run on 2 CPU processes (gloo), train like one process.

Each test makes ONE launch of a shipped config, with ``--num_processes 2`` as the only change:

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/test_fsdp.py SPEC

which runs this file as a worker (``__main__`` below); the worker runs the real CLI
(``percontrast.cli.main``) once per entry of SPEC, in the same 2 processes:

  perce          full fine-tuning, 2 x batch 2, 3 steps          vs 1 process x batch 4
  wrong_norm     the same with the WRONG normalization (per-process token count): must miss
  every_k_kill   --refresh every_k (k=2), 4 steps over 2 epochs, killed right after the
                 step-2 checkpoint (no final model is written) ...
  every_k_resume ... then resumed with --resume to step 4       vs 1 process x batch 4, uninterrupted
  lora           LoRA (r=8, q/k/v/o), 3 steps                    vs 1 process x batch 4
  ce, ce_gc, perce_gc   (FSDP only) 1 step each, all-gathers and layer forwards counted

Why FSDP on CPU needs one patch (accelerate's gate, not ours). accelerate 1.15 decides the engine in
``AcceleratorState.__init__`` (accelerate/state.py): an FSDP config turns the run into
``DistributedType.FSDP`` only in the branch for GPU-like process types (MULTI_GPU, MULTI_XPU, ...).
A CPU run is MULTI_CPU (the Trainer's ``use_cpu`` gives ``PartialState(cpu=True)``), so the FSDP
plugin is dropped without a word and the Trainer wraps the model in DDP (seen here: DDP's
``find_unused_parameters`` warning, no FSDPModule; percontrast now warns, see
``test_fsdp_dropped_on_cpu_is_reported``). The worker wraps ``AcceleratorState.__init__``: a
MULTI_CPU state that was handed an FSDP plugin becomes FSDP with that plugin, which is what the same
code does on GPUs. Nothing else is patched: accelerate's ``fsdp2_prepare_model`` (fully_shard per
decoder layer, a unit for the tied embedding / final norm / LM head, the root), the Trainer's FSDP
save and load of model and optimizer, and percontrast's E-step run as they would on GPUs. The
worker records that the model the Trainer trains is an ``FSDPModule`` with every parameter a
sharded DTensor, and the test asserts it. DeepSpeed needs no patch: the same ``__init__`` turns a
run into DeepSpeed from the launcher's environment whatever the process type (unless the
Accelerator itself is created with ``cpu=True``, which the Trainer does not), and DeepSpeed picks
its CPU accelerator (gloo) by itself; the worker records the engine and ZeRO stage.

Why the global batches hold the same examples: as in tests/test_distributed.py (the seedable
sampler; float64; plain SGD). Constant LR, except in the every_k runs: a linear decay, which the
killed run shares with the uninterrupted reference (both have max_steps 4), so the resumed run
must also restore the decayed learning rate.

The bound for FSDP2, derived as in test_distributed.py. FSDP2 differs from DDP only in how the
gradient is reduced: a reduce-scatter (sum of the 2 processes' float64 gradients, divided by 2)
instead of an all-reduce, i.e. again another float64 summation order per gradient entry, so the
derivation there holds unchanged (a gradient entry moves by < 1e-10, a parameter by ~1e-12 after
3-4 steps; PARAM_TOL = 1e-9 leaves a margin of ~1000). The all-gathers that rebuild the full
parameters are copies (no arithmetic). LoRA: the same sums feed fewer trainable entries.

The bound for DeepSpeed ZeRO-2/3, derived. ZeRO keeps the optimizer's master copy of every
trainable parameter in float32, whatever the model's dtype (deepspeed/runtime/zero: ``.float()``),
applies SGD to it and copies it back into the float64 model. So each DeepSpeed parameter is
rounded to float32 once at the start and once per step: each rounding moves an entry by at most
half a float32 ulp, 2^-24 |w| <= 6e-8 |w|; the largest |w| is 1.0 (the RMSNorm weights; every
other initial weight is < 0.2 and 4 SGD steps at lr <= 3e-2 move none by 1e-2), so 1 + 4 roundings
give <= 3e-7. The rounded weights also change the next gradients: an error e in the weights
becomes at most (1 + lr x ||Hessian||) e after a step; DS_PARAM_TOL = 1e-6 allows a factor 3 for
that over 4 steps, i.e. lr x ||Hessian|| <= 0.3. That part is assumed, not derived (SGD steps this
small on a 2-layer model with weights of ~0.02 are far from that; the measured difference, 2.4e-7,
is 4 roundings of 6e-8 with no growth). The wrong
normalization must still miss it by 10x (it misses the float64 reference by ~5e-5). The logged losses pass through the Trainer's float32 accumulator:
LOSS_RTOL = 1e-6 relative as derived in test_distributed.py, for both engines; for DeepSpeed also an
absolute part for the rounded weights, derived per step in ``_loss_atol``.

Not blind: ``wrong_norm`` (each process divides by its own token count, then the engine averages)
must miss the bound by 1000x (FSDP) / 10x (DeepSpeed); the trained parameters must have moved
(> 1e-4) from their initial values (LoRA's B matrices start at 0); both ranks must have written
their records; the engine must be FSDP2 / ZeRO-n; and the killed run must have stopped after
checkpoint-2 with no final model, then resumed from that checkpoint.

All-gathers per optimizer step under FSDP2 (counted by wrapping FSDP2's ``foreach_all_gather``,
one call per FSDP unit it unshards, in each rank), and decoder-layer forwards (counted in the MLP's
``forward``, which also runs when gradient checkpointing recomputes a layer in backward; module
hooks do not fire there). The exact counts are asserted in ``test_fsdp2_matches_one_process``
and derived there from FSDP2's rules.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))   # the worker runs as a script under accelerate launch

from helpers.fsdp import force_fsdp_on_cpu  # noqa: E402
from helpers import ROOT, cli_env, load_params, max_param_diff, run_cli, step_losses, write_records  # noqa: E402

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]   # the accelerate of this environment
CONFIGS = ROOT / "configs" / "accelerate"
PARAM_TOL = 1e-9       # FSDP2, derived in the module docstring (as in test_distributed.py)
DS_PARAM_TOL = 1e-6    # DeepSpeed (float32 master weights), derived in the module docstring
LOSS_RTOL = 1e-6
KILL_AFTER = 2         # every_k_kill: killed right after the checkpoint of this step


# ----------------------------------------------------------------------------- the worker
class _Killed(Exception):
    pass


def _engine(model) -> dict:
    """What the Trainer trains: FSDP2 (units, sharded parameters) or a DeepSpeed engine (ZeRO stage)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    if isinstance(model, FSDPModule):
        params = list(model.parameters())
        units: dict = {}    # the FSDP units (parameter groups) that hold parameters
        for m in model.modules():
            if isinstance(m, FSDPModule) and (g := m._get_fsdp_state()._fsdp_param_group) is not None:
                units.setdefault(id(g), []).append(type(m).__name__.removeprefix("FSDP"))
        return {"engine": "fsdp2", "sharded": all(isinstance(p, DTensor) for p in params) and len(params) > 0,
                "units": list(units.values())}
    if hasattr(model, "zero_optimization_stage"):
        stage = model.zero_optimization_stage()
        params = list(model.module.parameters())
        if stage == 3:   # each rank holds a partition (ds_tensor) of every parameter
            return {"engine": "zero3", "sharded": all(p.ds_tensor.numel() < p.ds_numel for p in params),
                    "gathered_at_first_step": sum(p.numel() > 0 for p in params)}
        return {"engine": f"zero{stage}", "sharded": type(model.optimizer).__name__ == "DeepSpeedZeroOptimizer"}
    return {"engine": type(model).__name__, "sharded": False}


def _worker(spec: Path) -> None:
    """Run each entry {"name", "argv", "inject"} of ``spec`` with percontrast.cli.main in this process
    and write <spec>.<name>.rank-<R>-of-<W>.json: the engine, and per training step the FSDP
    all-gathers and the decoder-layer forwards (all of them / in the E-step)."""
    force_fsdp_on_cpu()
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    import percontrast.trainer as tr
    from helpers.multi_run import per_process_mean
    from percontrast.cli import main

    counts = {"gather": 0, "gather_estep": 0, "layer_fwd": 0, "layer_fwd_estep": 0}
    in_estep = [False]
    real_gather = pg.foreach_all_gather

    def counting_gather(*a, **k):
        counts["gather"] += 1
        counts["gather_estep"] += in_estep[0]
        return real_gather(*a, **k)

    pg.foreach_all_gather = counting_gather
    patched_mlps: set = set()

    def count_forwards(cls):
        # In the MLP's forward itself: module hooks do not fire in a checkpoint's recomputation
        # (torch 2.13), and transformers 5 checkpoints the layer's forward, not its __call__.
        if cls in patched_mlps:
            return
        patched_mlps.add(cls)
        real_forward = cls.forward

        def forward(self, *a, **k):
            counts["layer_fwd"] += 1
            counts["layer_fwd_estep"] += in_estep[0]
            return real_forward(self, *a, **k)
        cls.forward = forward

    real_cf, real_step = tr.PerCETrainer._cf_logp, tr.PerCETrainer.training_step
    real_loss, real_save = tr.PerCETrainer.compute_loss, tr.PerCETrainer._save_checkpoint
    record: dict = {}

    def cf_logp(self, model, inputs):
        in_estep[0] = True
        try:
            return real_cf(self, model, inputs)
        finally:
            in_estep[0] = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "engine" not in record:
            record.update(_engine(model))
            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            record["layers"] = len(layers)
            for m in layers:
                count_forwards(type(m.mlp))
        before = dict(counts)
        out = real_step(self, model, inputs, num_items_in_batch)
        record.setdefault("steps", []).append({k: counts[k] - before[k] for k in counts})
        return out

    def save_then_die(self, model, trial):
        real_save(self, model, trial)
        if self.state.global_step == KILL_AFTER:
            raise _Killed   # what a kill right after the checkpoint leaves: no final model

    tr.PerCETrainer._cf_logp, tr.PerCETrainer.training_step = cf_logp, training_step
    rank, world = os.environ.get("RANK", "none"), os.environ.get("WORLD_SIZE", "none")
    for run in json.loads(spec.read_text()):
        record.clear()
        inject, argv = run.get("inject"), run["argv"]
        tr.PerCETrainer.compute_loss = per_process_mean if inject == "per_process_mean" else real_loss
        tr.PerCETrainer._save_checkpoint = save_then_die if inject == "kill" else real_save
        t0 = time.perf_counter()
        try:
            rc = main(argv)
            record["killed"] = False
        except _Killed:
            rc, record["killed"] = 0, True
            out = Path(argv[argv.index("--output-dir") + 1])
            record["final_model_after_kill"] = any(out.glob("*.safetensors"))
        if rc:
            sys.exit(rc)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        (spec.parent / f"{spec.stem}.{run['name']}.rank-{rank}-of-{world}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests
import pytest  # noqa: E402
import torch  # noqa: E402


def _argv(data, out, batch, method="perce", steps=3, *extra):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", method,
            "--max-steps", str(steps), "--batch-size", str(batch), "--grad-accum", "1",
            "--max-length", "192", "--learning-rate", "3e-3", "--warmup", "0", "--lr-scheduler", "constant",
            "--no-progress", "--no-report", "--clip-min", "0.2", "--clip-max", "5", "--dtype", "float64",
            "--optim", "sgd", "--output-dir", str(out), *extra]


# as in test_distributed.py: k=2 over 4 steps (2 epochs of 2 steps); the weights are the PIR itself
# (wide clip), so a PIR from another model version, or a cache lost in the kill, changes the update.
# A linear LR decay (the killed run has max_steps 4 too, so its schedule is the same): the resumed
# run must also restore the decayed learning rate.
EVERY_K = ("--refresh", "every_k", "--refresh-every", "2", "--clip-min", "-50", "--clip-max", "50",
           "--allow-negative-clip", "--save-steps", "2", "--save-total-limit", "4", "--lr-scheduler", "linear")
LORA = ("--lora", "--learning-rate", "3e-2")


def _every_k(data, out, batch, *extra):
    return _argv(data, out, batch, "perce", 4, *EVERY_K, *extra)


def _parity_runs(data, t: Path) -> list[dict]:
    return [
        {"name": "perce", "argv": _argv(data, t / "perce", 2)},
        {"name": "wrong_norm", "argv": _argv(data, t / "wrong_norm", 2), "inject": "per_process_mean"},
        {"name": "every_k_kill", "argv": _every_k(data, t / "every_k", 2), "inject": "kill"},
        {"name": "every_k_resume", "argv": _every_k(data, t / "every_k", 2, "--resume")},
        {"name": "lora", "argv": _argv(data, t / "lora", 2, "perce", 3, *LORA)},
    ]


def _launch_and_reference(t: Path, config: Path, runs: list[dict], data: Path) -> None:
    """One 2-process launch of ``config`` running ``runs``; meanwhile the 1-process references."""
    spec = t / "launch.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.Popen([*LAUNCH, "--config_file", str(config), "--num_processes", "2", "--main_process_port",
                             "0", str(HERE / "test_fsdp.py"), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(ROOT))
    try:
        for argv in (_argv(data, t / "ref", 4), _every_k(data, t / "every_k_ref", 4),
                     _argv(data, t / "lora_ref", 4, "perce", 3, *LORA)):
            rc, _, err = run_cli(argv)
            assert rc == 0, err
        _, err = proc.communicate(timeout=480)    # a stalled collective ends here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]


def _records(t: Path, name: str) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted(t.glob(f"launch.{name}.rank-*-of-2.json"))]
    assert len(recs) == 2, f"{name}: expected a record from each of 2 ranks, got {len(recs)}"
    return recs


def _params(out: Path, lora: bool = False) -> dict:
    if lora:
        from safetensors.torch import load_file
        return load_file(str(out / "adapter_model.safetensors"))
    p = load_params(out)
    # FSDP's and DeepSpeed's full state dicts also hold the tied lm_head.weight: a copy of the embedding
    if "lm_head.weight" in p:
        assert torch.equal(p.pop("lm_head.weight"), p["model.embed_tokens.weight"])
    return p


def _loss_atol(ref: Path, lora: bool) -> list[float]:
    """DeepSpeed: the loss of step k is computed on weights that went through k float32 roundings
    (2^-24 relative each), so to first order it moves by at most |grad| x ||dw|| <= g_k x k x 2^-24 x
    ||w||_2, with g_k the gradient norm the reference logged at step k; x2 for the rounded weights'
    effect on the earlier steps' gradients (see the module docstring). With the wide clip of the
    every_k runs the PIR weights have both signs and the loss (~0.02) is a small difference of larger
    terms, so a relative bound alone would not do."""
    w = _params(ref, lora)
    norm = sum(float((v.double() ** 2).sum()) for v in w.values()) ** 0.5
    grads = [h["grad_norm"] for h in json.loads((ref / "train_results.json").read_text())["log"] if "loss" in h]
    return [2 * k * 2.0 ** -24 * norm * g for k, g in enumerate(grads, start=1)]


def _same_run(out: Path, ref: Path, what: str, tol: float, lora: bool = False) -> float:
    res = json.loads((out / "train_results.json").read_text())
    assert res["steps"] == len(step_losses(ref)), what
    atol = _loss_atol(ref, lora) if tol > PARAM_TOL else [0.0] * len(step_losses(ref))
    for k, (a, b, t) in enumerate(zip(step_losses(out), step_losses(ref), atol), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(b) + t, f"{what}: loss of step {k}: {a} vs {b} (allowed {t:.1e} + rel)"
    diff = max_param_diff(_params(out, lora), _params(ref, lora))
    assert diff < tol, f"{what}: parameters differ from one process by {diff:.2e} (bound {tol:.0e})"
    return diff


def _check_parity(t: Path, engine: str, tol: float, mutation_factor: float) -> dict:
    """The parity runs of ``_parity_runs`` against the references; returns the measured differences."""
    for run in ("perce", "wrong_norm", "every_k_kill", "every_k_resume", "lora"):
        for r in _records(t, run):
            assert r["engine"] == engine and r["sharded"], (run, r)
    diffs = {
        "perce": _same_run(t / "perce", t / "ref", f"{engine} perce 2 x 2", tol),
        "every_k_killed_resumed": _same_run(t / "every_k", t / "every_k_ref", f"{engine} every_k, killed + resumed",
                                            tol),
        "lora": _same_run(t / "lora", t / "lora_ref", f"{engine} LoRA", tol, lora=True),
    }
    diffs["wrong_norm"] = max_param_diff(_params(t / "wrong_norm"), _params(t / "ref"))
    print(f"\n{engine} parity, max |param diff| vs 1 process: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert diffs["wrong_norm"] > mutation_factor * tol, f"the per-process mean is invisible ({diffs['wrong_norm']:.2e})"
    # the kill happened right after checkpoint-2 on both ranks, before any final model, and the
    # resumed run started from that checkpoint and ran the remaining steps
    for r in _records(t, "every_k_kill"):
        assert r["killed"] and not r["final_model_after_kill"] and len(r["steps"]) == KILL_AFTER, r
    assert json.loads((t / "every_k" / "train_results.json").read_text())["resumed_from"].endswith(
        f"checkpoint-{KILL_AFTER}")
    assert all(len(r["steps"]) == 4 - KILL_AFTER for r in _records(t, "every_k_resume"))
    # the steps moved the weights, or equality would prove nothing
    from percontrast.models import load_model
    init = {k: v.detach() for k, v in load_model("tiny-random", dtype="float64")[0].state_dict().items()}
    ref = _params(t / "ref")
    assert max_param_diff({k: init[k] for k in ref}, ref) > 1e-4
    assert max(v.abs().max().item() for k, v in _params(t / "lora_ref", lora=True).items() if "lora_B" in k) > 1e-4
    return diffs


def test_fsdp2_matches_one_process(tmp_path):
    t = tmp_path
    data = write_records(t / "train.jsonl", n=8)
    runs = _parity_runs(data, t) + [
        {"name": "ce", "argv": _argv(data, t / "ce", 2, "ce", 1)},
        {"name": "ce_gc", "argv": _argv(data, t / "ce_gc", 2, "ce", 1, "--gradient-checkpointing")},
        {"name": "perce_gc", "argv": _argv(data, t / "perce_gc", 2, "perce", 1, "--gradient-checkpointing")},
    ]
    _launch_and_reference(t, CONFIGS / "fsdp.yaml", runs, data)
    _check_parity(t, "fsdp2", PARAM_TOL, 1000)

    # All-gathers and decoder-layer forwards per optimizer step (grad_accum 1: one training_step),
    # the same on both ranks and on every step.
    per_step = {}
    for name in ("ce", "perce", "ce_gc", "perce_gc", "lora"):
        steps = [s for r in _records(t, name) for s in r["steps"]]
        assert all(s == steps[0] for s in steps), (name, steps)
        per_step[name] = steps[0]
    rec = _records(t, "ce")[0]
    layers, units = rec["layers"], len(rec["units"])
    lora_units = len(_records(t, "lora")[0]["units"])
    print("FSDP2 units:", rec["units"], "| LoRA:", _records(t, "lora")[0]["units"])
    print("FSDP2 per optimizer step:", json.dumps(per_step))
    assert layers == 2 and units == 3   # 2 decoder layers + one for [tied embedding / LM head, final norm]
    ce, perce, ce_gc, perce_gc = (per_step[k] for k in ("ce", "perce", "ce_gc", "perce_gc"))
    # ce: every unit is gathered once in the forward; the decoder layers (reshard_after_forward) are
    # gathered again in the backward; the embedding/head unit (reshard_after_forward False) stays.
    assert ce["gather"] == units + layers and ce["layer_fwd"] == layers
    # perce: the E-step runs after the training forward: one more all-gather per decoder layer and
    # none for the unit still unsharded; one forward per layer, never a recomputation.
    assert perce["gather_estep"] == perce["layer_fwd_estep"] == layers
    assert perce["gather"] == ce["gather"] + layers and perce["layer_fwd"] == 2 * layers
    # gradient checkpointing: the recomputation runs inside the backward after FSDP gathered the
    # layer, so no extra all-gather; it recomputes each layer once for ce and perce alike, and the
    # no-grad E-step is neither checkpointed nor recomputed
    assert ce_gc["gather"] == ce["gather"] and perce_gc["gather"] == perce["gather"]
    assert ce_gc["layer_fwd"] == 2 * layers and perce_gc["layer_fwd"] == 3 * layers
    assert perce_gc["gather_estep"] == perce_gc["layer_fwd_estep"] == layers
    # LoRA (a PEFT model): accelerate leaves the final norm in the root unit (one unit more); the
    # E-step still adds exactly one all-gather per decoder layer
    assert lora_units == units + 1
    assert per_step["lora"]["gather"] == lora_units + 2 * layers and per_step["lora"]["gather_estep"] == layers
    # --refresh every_k resumed after step 2: step 3 (global_step 2, divisible by k) re-estimates PIR,
    # step 4 reuses the cache on every rank: no E-step, no extra all-gather
    for r in _records(t, "every_k_resume"):
        assert [s["gather"] for s in r["steps"]] == [perce["gather"], ce["gather"]], r["steps"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed (not in requirements.txt; see docs/scaling.md)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(tmp_path, stage):
    data = write_records(tmp_path / "train.jsonl", n=8)
    _launch_and_reference(tmp_path, CONFIGS / f"deepspeed-zero{stage}.yaml", _parity_runs(data, tmp_path), data)
    _check_parity(tmp_path, f"zero{stage}", DS_PARAM_TOL, 10)


def test_fsdp_dropped_on_cpu_is_reported(tmp_path, monkeypatch, capsys):
    """An FSDP launch on CPU trains with DDP (accelerate's gate, see the module docstring): percontrast
    says so instead of leaving the user to believe the model is sharded. In one process the same gate
    drops the plugin (the state is NO, not a GPU type), so this runs in-process."""
    from accelerate.state import AcceleratorState

    from percontrast.commands.train import TrainConfig, build_trainer
    from percontrast.datasets import load_records
    from percontrast.models import load_model
    from percontrast.prompts import get_task

    cfg = TrainConfig(model="tiny-random", data=str(write_records(tmp_path / "t.jsonl", n=2)), task="generic",
                      method="perce", batch_size=2, max_length=192, output_dir=str(tmp_path / "o"), progress=False)
    records = load_records(cfg.data, get_task("generic"))
    model, tok = load_model("tiny-random")
    try:
        build_trainer(cfg, model, tok, records)
        assert "FSDP" not in capsys.readouterr().err          # no FSDP asked for: nothing said
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer, _ = build_trainer(cfg, model, tok, records)
        assert not trainer.is_fsdp_enabled
        err = capsys.readouterr().err
        assert "FSDP" in err and "DDP" in err, err
    finally:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        AcceleratorState._reset_state(reset_partial_state=True)
