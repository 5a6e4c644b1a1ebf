"""Sharded loading of DeepSeek-V4: each rank of a tensor / expert parallel group reads only its
experts and its slices of the head-sharded tensors (fp32, tiny random folders).

* Every rank's model equals the whole model cut in memory (``shard_in_place``), tensor for
  tensor and bit for bit, for the float folder and the released FP8 / FP4 layout (16 x 16 FP8
  blocks: some ranges fall on block edges and are read with their scales' ranges, others cut
  blocks and are dequantised whole first), and reads less than the folder holds.
* An engine on a group holds rank 0's shard only (no whole copy of the target beside the group),
  plainly and with the ``mtp`` drafter built from that shard, and decodes what one rank decodes.
* A copy of the folder without the other ranks' expert tensors (and their scales) loads for
  rank r, and a group whose rank r loads that copy gives one rank's logits: rank r never needs
  them.  The same copy loaded whole is refused, naming a missing expert.
"""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers.models.deepseek_v4")

from dspark.models.deepseek_v4_shards import build_rank_model  # noqa: E402
from dspark.models.deepseek_v4_tp import expert_range, shard_in_place  # noqa: E402
from dspark.models.deepseek_v4_config import SLIDING  # noqa: E402
from dspark.models.llama import Shard  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.net import free_port  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput, TPSpec, build_rank  # noqa: E402
from helpers.quantise_v4 import quantise_folder  # noqa: E402
from helpers.tiny_deepseek_v4 import mtp_checkpoint_tensors, tiny_mtp_layer, write_mtp, write_tiny_folder  # noqa: E402

VOCAB = 261  # not a multiple of 2 or 4: the last rank's LM head rows are padded
CFG = RunnerConfig(n_slots=2, max_seq=128)
WIDE = dict(moe_intermediate_size=32)  # FP4 scales cover 32 values of a row: expert rows of 32
EXPERT = re.compile(r"layers\.\d+\.ffn\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(float folder, the same in the released quantised layout)."""
    src = tmp_path_factory.mktemp("v4shard")
    target = write_tiny_folder(src, VOCAB, 71, **WIDE)
    one, own = tiny_mtp_layer(target, SLIDING, seed=72, vocab_size=VOCAB, **WIDE)
    write_mtp(src, mtp_checkpoint_tensors(one, own), SLIDING)  # the MTP drafter's layer
    qdir = tmp_path_factory.mktemp("v4shardq")
    quantise_folder(src, qdir, (16, 16))
    return src, qdir


def keep_only_experts(src, dst, keep: range) -> int:
    """Copy V4 folder ``src`` to ``dst`` without the decoder's routed experts outside ``keep``
    (weights and block scales); returns how many tensors were left out."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    dropped = 0
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        kept = {}
        for k, v in load_file(str(f)).items():
            hit = EXPERT.search(k)
            if hit and not k.startswith("mtp.") and int(hit[1]) not in keep:
                dropped += 1
            else:
                kept[k] = v
        save_file(kept, str(dst / f.name), metadata={"format": "pt"})
    return dropped


def folder_bytes(path, prefix: str, inside: str = "") -> int:
    """Bytes of the folder's tensors whose names start with ``prefix`` and contain ``inside``."""
    from dspark.models.safetensors_slices import SafetensorsFolder

    with SafetensorsFolder(path) as folder:
        return sum(e.nbytes for n, e in folder.entries.items() if n.startswith(prefix) and inside in n)


def steps() -> list[StepInput]:
    """Two prefills, then decode and 3-token verify steps across several CSA / HCA windows."""
    gen = torch.Generator().manual_seed(5)
    out = [StepInput(torch.randint(0, 256, (30,), generator=gen).tolist(), [0, 1], [0, 0], [19, 11])]
    lens = [19, 11]
    for _ in range(12):
        out.append(StepInput(torch.randint(0, 256, (4,), generator=gen).tolist(), [0, 1], list(lens), [1, 3]))
        lens = [lens[0] + 1, lens[1] + 2]
    return out


def run_group(paths: list, world: int) -> list[torch.Tensor]:
    """The logits of ``steps()`` on a gloo group whose rank r loads ``paths[r]``."""
    import torch.multiprocessing as mp

    from dspark.workers.runner import _spawned_rank

    init = f"tcp://127.0.0.1:{free_port()}"
    spec = TPSpec(model_path=None, dtype="fp32", world_size=world, runner=CFG, threads_per_rank=1)
    procs = [mp.get_context("spawn").Process(target=_spawned_rank, daemon=True,
                                             args=(TPSpec(**{**spec.__dict__, "model_path": str(paths[r])}), r, init))
             for r in range(1, world)]  # fmt: skip
    for p in procs:
        p.start()
    driver, _ = build_rank(TPSpec(**{**spec.__dict__, "model_path": str(paths[0])}), 0, init)
    try:
        assert driver.model.shard == Shard(0, world)
        return [driver.forward(s).logits for s in steps()]
    finally:
        driver.close()
        for p in procs:
            p.join(timeout=30)
        dist.destroy_process_group()


@pytest.mark.parametrize("quantised", [False, True], ids=["float", "fp8-fp4"])
def test_each_rank_reads_its_slices_of_the_whole_model(folders, quantised):
    path = folders[quantised]
    whole = load_model(path, dtype="fp32")
    for world in (2, 4):
        for rank in range(world):
            shard = Shard(rank, world)
            got = load_model(path, dtype="fp32", shard=shard).model
            want = shard_in_place(copy.deepcopy(whole.model), shard)
            assert got.shard == shard and got.layers[1].ffn.first_expert == expert_range(got.cfg, shard).start
            assert got.layers[0].attn.n_heads == want.layers[0].attn.n_heads == 4 // world
            g, w = got.state_dict(), want.state_dict()
            assert g.keys() == w.keys()
            for k in w:
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
    cfg, args = whole.model.cfg, whole.args
    _, alone = build_rank_model(path, cfg, args, torch.float32, "cpu")
    _, part = build_rank_model(path, cfg, args, torch.float32, "cpu", Shard(1, 4))
    assert alone.bytes_read == alone.bytes_total - folder_bytes(path, "mtp.")  # the decoder, once
    experts = folder_bytes(path, "model.layers.", ".ffn.experts.")
    # A quarter of the experts, and less than the rest whole: the head-sharded tensors in part.
    assert experts // 4 < part.bytes_read < alone.bytes_read - experts + experts // 4, (part, alone, experts)


@pytest.mark.parametrize("quantised", [False, True], ids=["float", "fp8-fp4"])
def test_a_rank_loads_without_the_other_ranks_experts(folders, quantised, tmp_path):
    path, world, rank = folders[quantised], 2, 1
    one = load_model(path, dtype="fp32")
    mine = expert_range(one.model.cfg, Shard(rank, world))
    dropped = keep_only_experts(path, tmp_path / "rank1", mine)
    cfg = one.model.cfg
    per_expert = 3 * (2 if quantised else 1)  # w1, w2, w3 (and their scales)
    assert dropped == cfg.num_hidden_layers * (cfg.n_routed_experts - len(mine)) * per_expert
    with pytest.raises(ValueError, match=r"^tensor layers\.0\.ffn\.experts\.0\.w1\.weight is missing"):
        load_model(tmp_path / "rank1", dtype="fp32")
    single = LocalRunner(one.model, CFG)
    want = [single.forward(s).logits for s in steps()]
    assert want[0].abs().max() > 1.0
    got = run_group([path, tmp_path / "rank1"], world)
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("draft", ["mtp", "none"])
def test_a_group_holds_no_whole_copy_of_the_target(folders, draft):
    """``build_engine`` with a group of 2 (``dspark generate --tp 2``): rank 0's shard stands for
    the target in the driver process, plainly and for the mtp drafter."""
    from dspark.workers.drafters.mtp import MTPDrafter
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams

    path = folders[0]
    one = load_model(path, dtype="fp32")
    prompts = [list(b"the cat sat on the mat"), list(b"a b a b")]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    engine = Engine(LocalRunner(one.model, CFG), one.tokenizer, EngineConfig(max_batch=2, block_len=2))
    plain = [s.output_ids for s in engine.generate(prompts, params)]
    spec = EngineSpec(model=str(path), dtype="fp32", tp=2, draft=draft, block_len=2, runner=CFG)
    built = build_engine(spec, progress=False)
    try:
        assert isinstance(built.engine.drafter, MTPDrafter) == (draft == "mtp")
        assert built.loaded.model is built.tp_group.driver.model and built.loaded.model.shard == Shard(0, 2)
        assert [s.output_ids for s in built.engine.generate(prompts, params)] == plain
        assert (built.engine.metrics.num_draft_tokens > 0) == (draft == "mtp")
    finally:
        built.close()


def test_bad_input_is_refused_in_one_line(folders, tmp_path):
    from dspark.models.safetensors_slices import SafetensorsFolder

    with pytest.raises(ValueError, match="^tensor / expert parallel size 3 must divide num_attention_heads=4$"):
        load_model(folders[0], dtype="fp32", shard=Shard(0, 3))
    (tmp_path / "model.safetensors").write_bytes((12).to_bytes(8, "little") + b"not a header")
    with pytest.raises(ValueError, match="^model.safetensors: not a safetensors file"):
        SafetensorsFolder(tmp_path)
    with SafetensorsFolder(folders[0]) as folder:
        name = next(n for n in folder.entries if n.endswith("wo_b.weight"))
        rows, cols = folder.shape(name)
        assert torch.equal(folder.read(name, (1, 2, 5)), folder.read(name)[:, 2:5])  # one read per row
        with pytest.raises(ValueError, match=r"no range 0:\d+ along dim 1$"):
            folder.read(name, (1, 0, cols + 1))


def test_docstring_examples():
    import doctest

    from dspark.models import deepseek_v4_loader, deepseek_v4_tp

    for module in (deepseek_v4_tp, deepseek_v4_loader):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__
