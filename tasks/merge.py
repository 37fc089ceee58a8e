"""Thin Prefect task for the merge: fold the adapter into the base and publish a NEW versioned
model folder ``<root>/models/<project>/<version>/``, never over an earlier one."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from prefect import task

from fish_speech_core import storage
from fish_speech_core.links import browser_link
from fish_speech_core.registry import MODELS, new_version
from fish_speech_core.storage import Store, local_file, local_tree
from fishtune.tasks.params import MergeParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.stage import Stage, artifact_key

MERGE = Stage("merge", {"checkpoint": "checkpoint", "base": "base"})


@task(name="merge", cache_policy=MERGE.cache_policy, persist_result=True)
def merge_task(checkpoint: str, base: str, store_root: str, params: MergeParams = MergeParams(),
               work_dir: str | None = None) -> dict:
    """Merge, verify (logits of merged vs base + adapter) and publish; a link artifact names the model."""
    from prefect.artifacts import create_markdown_artifact

    from fish_speech_core.finetune.lora import read_adapter
    from fish_speech_core.finetune.merge import merge_checkpoint

    store = Store(store_root)
    work = work_folder(store_root, work_dir)
    ckpt = local_file(checkpoint, work / "inputs")
    base_dir = local_tree(base, work / "inputs")
    adapter = read_adapter(ckpt)
    if adapter.metadata is None:
        raise ValueError(f"{storage.redact(checkpoint)} carries no LoRA metadata; merge it with `fishtune merge`")
    args = {"checkpoint": checkpoint, "base": base, "params": params}
    inputs, key = MERGE.describe(args)
    version = new_version(key)
    project = params.project
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        report = merge_checkpoint(base_dir, ckpt, out, adapter.metadata.settings)
        lineage = {"project": project, "version": version, "adapter": checkpoint, "train_key": params.train_key,
                   "base_sha256": adapter.metadata.base_sha256, "inputs": inputs,
                   "created": datetime.now(timezone.utc).isoformat(), "max_logit_diff": report.max_logit_diff}
        (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
        # the marker also holds the key's parameters: with the inputs they give the key back (flows.uptodate)
        artifact = store.publish(f"{MODELS}/{project}", version, out, metadata={**lineage, "params": params.key_fields()})
    # A browser opens neither file:// nor s3:// links: the store URL as text, plus a pre-signed
    # https link to the weights for an s3 store.
    where = storage.redact(artifact.url)
    lines = [f"**Merged model** `{project}` version `{version}`", "", f"Folder on the store: `{where}`"]
    signed = None if store.local else browser_link(artifact.file_url("model.pth"))
    if signed:
        lines += ["", f"[Download model.pth]({signed}) (link valid for 7 days)"]
    create_markdown_artifact("\n".join(lines), key=artifact_key("fishtune", project, "merged-model"),
                             description=f"merged model {project} {version}")
    return {"stage": "merge", "key": key, "url": artifact.url, "version": version, "inputs": inputs,
            "summary": {"version": version, "changed_tensors": report.changed_tensors,
                        "total_tensors": report.total_tensors, "max_logit_diff": report.max_logit_diff}}
