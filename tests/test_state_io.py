"""Run-state files: tensors and plain data round-trip exactly; foreign, truncated or damaged files are refused."""

import errno
import pickle

import pytest
import torch

from dladiff.errors import DladiffError
from dladiff.state_io import StateFileError, read_state, save_state


class MarkerPayload:
    """A pickle that, when loaded, creates a marker file (what a crafted file in --out could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_crafted_pickle(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"fingerprint": "fp", "payload": MarkerPayload(marker)}))


def optimizer_state():
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.randn(3, 2)
    optimizer.step()
    return optimizer.state_dict()


def test_state_round_trips_exactly(tmp_path):
    generator = torch.Generator().manual_seed(7)
    state = {"epoch": 3, "delta": torch.randn(2, 3, 4, 4), "generator": generator.get_state(),
             "history": [{"epoch": 1, "attn": 0.1 + 0.2, "nan": float("nan")}], "flag": True, "none": None,
             "optimizer": optimizer_state(), "bf16": torch.randn(5).bfloat16(), "empty": torch.zeros(0, 3),
             "scalar": torch.tensor(2.5), "pair": (1, "a")}
    save_state(state, tmp_path / "s.safetensors", "test")
    back = read_state(tmp_path / "s.safetensors", "test")
    assert back["epoch"] == 3 and back["flag"] is True and back["none"] is None and back["pair"] == (1, "a")
    assert back["history"][0]["attn"] == 0.1 + 0.2 and back["history"][0]["nan"] != back["history"][0]["nan"]
    for key in ("delta", "generator", "bf16", "empty", "scalar"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    opt = back["optimizer"]
    assert list(opt["state"]) == [0] and opt["param_groups"] == state["optimizer"]["param_groups"]
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(opt["state"][0][key], value)
    generator.set_state(back["generator"])  # a real generator accepts the restored state
    torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3).load_state_dict(opt)


def test_objects_other_than_plain_data_are_not_written(tmp_path):
    with pytest.raises(TypeError, match="plain data"):
        save_state({"module": torch.nn.Linear(2, 2)}, tmp_path / "s", "test")
    assert list(tmp_path.iterdir()) == []


def test_crafted_pickle_is_refused_and_not_executed(tmp_path):
    path, marker = tmp_path / "state", tmp_path / "pwned"
    write_crafted_pickle(path, marker)
    with pytest.raises(StateFileError, match=str(path)):
        read_state(path, "test")
    assert not marker.exists()


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        raw[-3] ^= 0xFF  # a byte of tensor data: the file still parses, only the checksum sees it
        path.write_bytes(raw)


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped"])
def test_damaged_state_is_refused_with_the_file_named(tmp_path, how):
    path = tmp_path / "s.safetensors"
    save_state({"delta": torch.randn(4, 4), "epoch": 1}, path, "test")
    _damage(path, how)
    with pytest.raises(StateFileError, match=str(path)):
        read_state(path, "test")


def test_state_of_another_kind_is_refused(tmp_path):
    save_state({"epoch": 1}, tmp_path / "s", "result")
    with pytest.raises(StateFileError, match="'result'"):
        read_state(tmp_path / "s", "checkpoint")


def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import dladiff.state_io as state_io

    real_open = open

    class FullDisk:
        def __init__(self, *args):
            self.file = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if self.file.tell() > 64:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def seek(self, offset):
            return self.file.seek(offset)

    monkeypatch.setattr(state_io, "open", FullDisk, raising=False)
    path = tmp_path / "layer1.ckpt"
    with pytest.raises(DladiffError, match="disk is full") as info:
        save_state({"delta": torch.randn(64, 64)}, path, "test")
    assert str(path) in str(info.value) and "free some space" in str(info.value)
    assert list(tmp_path.iterdir()) == []
