"""`bench spec`'s figures: per-category summaries, every method against its own plain
decoding (ours vs ours, HF vs HF), the speedup summary and the plot."""

from __future__ import annotations

from pathlib import Path

from bench.spec_prompts import BUCKETS
from bench.spec_runners import DEFAULT_BLOCK


def summarize(recs: list[dict], meta: list[dict], plain: list[dict] | None) -> dict:
    """Per bucket (and "all"): per-user tokens/s, acceptance length, tokens per pass, same text."""
    out = {}
    for b in (*BUCKETS, "all"):
        rows = [(r, m, plain[j] if plain else None) for j, (r, m) in enumerate(zip(recs, meta)) if b in ("all", m["bucket"])]
        if not rows:
            continue
        drafts = sum(r.get("drafts", 0) for r, _, _ in rows)
        acc = sum(r.get("accepted", 0) for r, _, _ in rows)
        passes = [r["decode_passes"] for r, _, _ in rows if r.get("decode_passes")]
        row = {
            "requests": len(rows),
            "tokens_per_s": sum(r["tokens"] / r["seconds"] for r, _, _ in rows) / len(rows),
            "acceptance_length": 1.0 + acc / drafts if drafts else None,
            "tokens_per_pass": (sum(r["tokens"] - 1 for r, _, _ in rows if r.get("decode_passes")) / sum(passes)) if passes else None,
            "output_tokens": sum(r["tokens"] for r, _, _ in rows),
        }
        if plain:
            row["same_text_as_plain"] = sum(r["output_ids"] == p["output_ids"] for r, _, p in rows) / len(rows)
        out[b] = row
    return out


def report(raw: dict, meta: list[dict], blocks: dict[str, int]) -> tuple[dict, list[dict], list[dict]]:
    """Every method against the plain decoding of the same engine (ours vs ours, HF vs HF)."""
    lookup = blocks.get("ngram", DEFAULT_BLOCK["ngram"])
    results: dict[str, dict] = {}
    rows = []
    for key, by_method in raw.items():
        results[key] = {}
        for name, recs in by_method.items():
            base_name = "hf_plain" if name.startswith("hf_") else ("plain+det" if name.endswith("+det") else "plain")
            base = by_method.get(base_name) if name != base_name else None
            s = summarize(recs, meta, base)
            entry = {"label": _label(name, blocks), "block": lookup if name == "hf_lookup" else blocks.get(twin_name(name) if name.endswith("+det") else name),
                     "per_category": s}
            if base is not None:
                sb = summarize(base, meta, None)
                entry["speedup"] = {c: s[c]["tokens_per_s"] / sb[c]["tokens_per_s"] for c in s}
            results[key][name] = entry
            for c, v in s.items():
                rows.append({"conc": key[1:], "method": name, "block": entry["block"], "category": c,
                             "tok_s": v["tokens_per_s"], "speedup": entry.get("speedup", {}).get(c),
                             "accept_len": v["acceptance_length"], "tok_per_pass": v["tokens_per_pass"],
                             "same_text": v.get("same_text_as_plain")})
    summary = []
    for key in results:
        for name, label in (("ngram", "ngram vs our plain"), ("hf_lookup", "HF prompt lookup vs HF plain")):
            sp = results[key].get(name, {}).get("speedup")
            if sp:
                summary.append({"conc": key[1:], "ratio": label, **{c: sp.get(c) for c in (*BUCKETS, "all")}})
        for name, entry in results[key].items():  # speed of the deterministic mode vs the default
            twin = results[key].get(name[: -len("+det")]) if name.endswith("+det") else None
            if twin:
                a, b = entry["per_category"], twin["per_category"]
                summary.append({"conc": key[1:], "ratio": f"{name} vs {twin_name(name)}",
                                **{c: a[c]["tokens_per_s"] / b[c]["tokens_per_s"] if c in a and c in b else None
                                   for c in (*BUCKETS, "all")}})
    return results, rows, summary


def structured_report(raw: dict, meta: list[dict], blocks: dict[str, int]) -> tuple[dict, list[dict]]:
    """``--structured`` (concurrency 1, one schema): each configuration over all prompts against plain
    decoding under the same schema, plus the grammar masks' share of request latency (their
    seconds over the requests' seconds) and mean cost per mask, and how many outputs validate."""
    plain = raw.get("plain")
    results, rows = {}, []
    for name, recs in raw.items():
        base = plain if name != "plain" else None
        s = summarize(recs, meta, base)["all"]
        mask_s = sum(r["grammar_mask_seconds"] for r in recs)
        masks = sum(r["grammar_masks"] for r in recs)
        entry = {"label": _label(name, blocks), "block": blocks.get(name), **s,
                 "speedup": s["tokens_per_s"] / summarize(plain, meta, None)["all"]["tokens_per_s"] if base else None,
                 "grammar_mask_share": mask_s / sum(r["seconds"] for r in recs),
                 "grammar_mask_seconds": mask_s, "grammar_masks": masks,
                 "grammar_us_per_mask": 1e6 * mask_s / masks if masks else None,
                 "valid": sum(r["valid"] for r in recs)}
        results[name] = entry
        rows.append({"method": name, "block": entry["block"], "tok_s": s["tokens_per_s"], "vs_plain": entry["speedup"],
                     "accept_len": s["acceptance_length"], "tok_per_pass": s["tokens_per_pass"],
                     "mask_share": f"{entry['grammar_mask_share']:.2%}",
                     "mask_us": round(entry["grammar_us_per_mask"]) if masks else None,
                     "valid": f"{entry['valid']}/{len(recs)}", "same_text": s.get("same_text_as_plain")})
    return results, rows


def twin_name(name: str) -> str:
    return name[: -len("+det")]


def _label(name: str, blocks: dict[str, int]) -> str:
    if name == "hf_lookup":
        return f"HF prompt lookup ({blocks.get('ngram', DEFAULT_BLOCK['ngram'])}) vs HF plain"
    if name == "hf_plain":
        return "HF plain"
    if name in ("plain", "plain+det"):
        return "ours, " + name
    kind = twin_name(name) if name.endswith("+det") else name
    return f"{name} (block {blocks[kind]})"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(results)
    cats = [*BUCKETS, "all"]
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels), 4.8), squeeze=False)
    for ax, level in zip(axes[0], levels):
        methods = [m for m, r in results[level].items() if r.get("speedup")]
        width = 0.8 / max(1, len(methods))
        for k, m in enumerate(methods):
            ys = [results[level][m]["speedup"].get(c, 0.0) for c in cats]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cats))]
            ax.bar(xs, ys, width, label=results[level][m]["label"])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylabel("per-user tokens/s vs plain")
        ax.set_title(f"concurrency {level[1:]}: speedup per category")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
