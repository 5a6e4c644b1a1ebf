"""`dspark export-draft`: write a trained head in another drafter checkpoint format.

Formats: ``deepspec`` (DeepSpec's DSpark folder: config.json + model.safetensors, see
``dspark.models.deepspec_format``).  The target is loaded (fp32) because the format stores frozen
copies of its embedding and LM head.
"""

from __future__ import annotations

from pathlib import Path

import click

FORMATS = ("deepspec",)


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

    loaded = load_model(model, dtype="fp32", progress=False)
    path = Path(head_path) if head_path else default_head_path(loaded.name)
    try:
        head = load_head(path, loaded.model, target_name=loaded.name, draft_vocab=0)
        if mask_token_id is None:
            specials = sorted(loaded.tokenizer.special_ids)
            if not specials:
                raise ValueError("the target's tokenizer has no special tokens: pass --mask-token-id")
            mask_token_id = specials[-1]
        out = export_deepspec(head, out_dir, mask_token_id, dtype=parse_dtype(dtype))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out} ({fmt}, mask_token_id {mask_token_id})")
