"""``erpd export``: a run's policy as a complete Hugging Face model directory.

The trainer saves only the trainable parameters of a policy (``model.safetensors`` + ``policy.json``,
applied onto the base model). An export is the whole model with those parameters in place, written
with ``save_pretrained`` (weights, ``config.json``, generation config) and the tokenizer, so that

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

load it without erpd (evaluate it with lm-eval, serve it with vLLM, ...). Its ``manifest.json``
records what it is (run, policy, base model, the stage's config and final metrics) and checksums
every file of the directory (``verify_export``).
"""

from __future__ import annotations

import json
from pathlib import Path

from erpd.train import checked_io

EXPORT_FORMAT = "erpd.export"
EXPORT_VERSION = 1


def export_policy(run, name: str, out_dir: str | Path) -> Path:
    """Write policy ``name`` (base, teacher, student, control) of ``run`` (a ``pipeline.Run``) to
    ``out_dir``; the policy left in ``run`` is the base again."""
    from erpd.train.models import load_policy_state

    out = Path(out_dir)
    policy = run.policy
    run.reset_to_base()
    meta = {}
    try:
        if name != "base":
            src = run.policy_dir(name)
            if not src.is_dir():
                raise FileNotFoundError(f"{src}: no saved {name} policy in {run.out} (run its stage first)")
            meta = load_policy_state(policy, src).get("meta", {})
        checked_io.begin_directory(out)
        with checked_io.disk_errors(out, "the export is incomplete"):
            policy.model.save_pretrained(out, safe_serialization=True)
            policy.tokenizer.save_pretrained(out)
    finally:
        run.reset_to_base()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != checked_io.MANIFEST)
    checked_io.write_manifest(out, {f: {"sha256": checked_io.sha256_file(out / f), "bytes": (out / f).stat().st_size}
                                    for f in files},
                              EXPORT_FORMAT, EXPORT_VERSION, run=str(run.out), policy=name, base_model=run.cfg.model.name,
                              meta=json.loads(json.dumps(meta, default=str)))
    return out


def verify_export(directory: str | Path) -> dict:
    """Check an export against its manifest (every file's size and sha256); returns the manifest."""
    return checked_io.read_manifest(directory, EXPORT_FORMAT, EXPORT_VERSION, "export the policy again")
