"""`dspark export-draft`: write a trained head in another drafter checkpoint format.

Formats: ``deepspec`` (DeepSpec's DSpark folder: config.json + model.safetensors, see
``dspark.models.deepspec_format``) and ``speculators`` (the folder vLLM's speculators library saves
and vLLM loads, with a draft vocabulary for heads trained over one, see
``dspark.models.speculators_format``).  The target is loaded (fp32) because both formats store
frozen copies of its embedding and LM-head rows.
"""

from __future__ import annotations

from pathlib import Path

import click

FORMATS = ("deepspec", "speculators")


@click.command("export-draft")
@click.option("--head", "head_path", default=None, type=click.Path(dir_okay=False),
              help="our head (.safetensors + .json; default: the head shipped for the target)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="deepspec", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder to write")
@click.option("--model", default=None, help="target checkpoint (GGUF file or HF folder; default: the embedded model)")
@click.option("--mask-token-id", type=int, default=None,
              help="token id whose embedding row carries the mask vector (default: the target's last special token)")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="dtype of the written weights")
def export_draft(head_path, fmt, out_dir, model, mask_token_id, dtype):
    """Export a DSpark head in another checkpoint format."""
    from dspark.models.deepspec_format import export_deepspec
    from dspark.models.dspark_head import default_head_path, load_head
    from dspark.models.loader import load_model, parse_dtype
    from dspark.models.speculators_format import export_speculators

    loaded = load_model(model, dtype="fp32", progress=False)
    path = Path(head_path) if head_path else default_head_path(loaded.name)
    write = {"deepspec": export_deepspec, "speculators": export_speculators}[fmt]
    try:
        # DeepSpec's format is full-vocabulary; speculators' keeps the vocabulary the head was trained over.
        head = load_head(path, loaded.model, target_name=loaded.name, draft_vocab=0 if fmt == "deepspec" else None)
        if mask_token_id is None:
            specials = sorted(loaded.tokenizer.special_ids)
            if not specials:
                raise ValueError("the target's tokenizer has no special tokens: pass --mask-token-id")
            mask_token_id = specials[-1]
        out = write(head, out_dir, mask_token_id, dtype=parse_dtype(dtype))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out} ({fmt}, mask_token_id {mask_token_id})")
