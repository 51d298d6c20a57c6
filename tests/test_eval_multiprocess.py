"""Evaluation split over two processes (a gloo group on the CPU, as `accelerate launch` would set up on GPUs)
gives the report of one process, shares one predictions.jsonl, and resumes a run killed in a single process."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from test_eval_outputs import Stub, _lines, _report


def _worker(rank: int, world: int, init_file: str, data_root: str, out: str, resume: bool) -> None:
    from groundseg.eval.refer import evaluate_refer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = evaluate_refer(Stub(), data_root, "shapes", "unc", split="val", progress=False, batch_size=2,
                                model_name="stub", out=out, resume=resume)
        with open(f"{out}/metrics.rank{rank}.json", "w") as f:
            json.dump(result.metrics, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shapes_dir(shapes_folder):
    return shapes_folder(seed=5, images=40)


def test_two_processes_give_the_single_process_report(shapes_dir, tmp_path):
    """A run killed in one process and finished by two equals an uninterrupted single-process run (one spawn of
    two processes keeps the test short: importing torch twice is most of its time)."""
    from groundseg.eval.refer import evaluate_refer

    common = dict(data_root=str(shapes_dir), dataset="shapes", split_by="unc", split="val", progress=False,
                  batch_size=2, model_name="stub")
    one = evaluate_refer(Stub(), out=str(tmp_path / "one"), **common)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate_refer(Stub(die_after=2), out=str(cut), **common)
    before = len(_lines(cut))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(shapes_dir), str(cut), True), nprocs=2)
    assert _report(cut) == _report(tmp_path / "one")
    assert json.loads((cut / "report.json").read_text())["resumed_expressions"] == before
    for rank in (0, 1):  # every process returns the merged metrics
        assert json.loads((cut / f"metrics.rank{rank}.json").read_text()) == json.loads(json.dumps(one.metrics))
    ids = [r["sent_id"] for r in _lines(cut)]  # both processes appended to the one file, each sentence once
    assert sorted(ids) == sorted(r["sent_id"] for r in one.records) and len(set(ids)) == len(ids)
