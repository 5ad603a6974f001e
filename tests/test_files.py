"""The one save / hash / name helper every saved artifact uses (kernels/files.py).

Atomic writes (nothing half-written, destination untouched on failure), the content checksum
that every saved file carries and that loading checks (inversions, instructions and their
checkpoints, converted operators), visible sanitised names, ComfyUI's counter format.
"""
import json
import os
import struct

import pytest
import torch

from photoops.kernels import files as kf
from photoops.kernels import instructbrush as ib
from photoops.kernels.inversion_state import Inversion, InversionFileError, load_inversion, save_inversion


def alter_tensor_bytes(path, offset: int = 0) -> None:
    """Flip one byte inside the tensor data of a safetensors file (its header stays valid)."""
    with open(path, "rb+") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n + offset)
        b = f.read(1)
        f.seek(8 + n + offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_atomic_save_round_trip_mode_and_checksum(tmp_path):
    t = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(3)}
    path = kf.save_safetensors_atomic(tmp_path / "sub" / "x.safetensors", t, {"k": 1})
    got, meta = kf.read_safetensors(path)
    assert set(got) == {"a", "b"} and got["b"].dtype == torch.float16 and torch.equal(got["b"], t["b"])
    assert meta["k"] == "1" and meta[kf.CHECKSUM_KEY] == kf.tensors_checksum(t)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert os.listdir(tmp_path / "sub") == ["x.safetensors"]       # no temporary file left


def test_failed_save_leaves_the_destination_and_no_temp_file(tmp_path):
    path = tmp_path / "x.safetensors"
    kf.save_safetensors_atomic(path, {"a": torch.zeros(2)})
    before = path.read_bytes()
    with pytest.raises(Exception):
        kf.save_safetensors_atomic(path, {"a": torch.zeros(2), "b": "not a tensor"})  # type: ignore[dict-item]
    with pytest.raises(Exception):                                    # safetensors refuses shared storage
        base = torch.zeros(4)
        kf.save_safetensors_atomic(path, {"a": base[:2], "b": base})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_altered_bytes_fail_with_the_file_name(tmp_path):
    path = kf.save_safetensors_atomic(tmp_path / "x.safetensors", {"a": torch.randn(16)})
    alter_tensor_bytes(path, 5)
    with pytest.raises(kf.ChecksumError, match=r"x\.safetensors is corrupt or was altered"):
        kf.read_safetensors(path)


def test_files_without_a_checksum_still_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    got, meta = kf.read_safetensors(tmp_path / "other.safetensors")
    assert torch.equal(got["a"], torch.ones(2)) and kf.CHECKSUM_KEY not in meta


def test_content_hash_sees_values_shapes_dtypes_not_dict_order():
    a = torch.arange(12.0)
    assert kf.content_hash(a) == kf.content_hash(a.clone())
    assert kf.content_hash(a) != kf.content_hash(a.reshape(3, 4))
    assert kf.content_hash(a) != kf.content_hash(a.double())
    b = a.clone()
    b[7] += 1
    assert kf.content_hash(a) != kf.content_hash(b)
    assert kf.content_hash({"x": a, "y": b}) == kf.content_hash({"y": b, "x": a})
    assert kf.content_hash({"x": a, "y": b}) != kf.content_hash({"x": b, "y": a})
    assert kf.content_hash(1, "a") != kf.content_hash("a", 1)
    assert kf.content_hash(torch.ones(3, dtype=torch.bfloat16)) != kf.content_hash(torch.ones(3, dtype=torch.float16))
    big = torch.randn(100_000)
    c = big.clone()
    c[1] += 1                                              # not on the stride of 1000 samples
    assert kf.content_hash(big, stride_to=1000) == kf.content_hash(c, stride_to=1000)
    assert kf.content_hash(big) != kf.content_hash(c)
    assert len(kf.content_hash(a, length=16)) == 16


@pytest.mark.parametrize("name, want", [("photo", "photo"), ("../photo", "photo"), ("../../etc/x", "etc_x"),
                                        (".hidden", "hidden"), ("a b/c", "a_b_c"), ("..", "dflt"), ("", "dflt"),
                                        ("  ", "dflt"), ("ok-1.v2", "ok-1.v2"), ("x.", "x")])
def test_clean_name_gives_visible_names(name, want):
    got = kf.clean_name(name, "dflt")
    assert got == want
    assert not got.startswith(".") and "/" not in got


def test_counter_name_is_comfyui_output_numbering():
    assert kf.counter_name("inv", 1) == "inv_00001_.safetensors"
    assert kf.counter_name("inv", 123, ".latent") == "inv_00123_.latent"


def _inversion():
    g = torch.Generator().manual_seed(0)
    return Inversion(method="ddpm", sigmas=torch.tensor([14.6, 3.0, 0.5, 0.03], dtype=torch.float64),
                     x_start=torch.randn(1, 4, 8, 8, generator=g), skip=0, noises=torch.randn(3, 1, 4, 8, 8, generator=g),
                     source_cfg=1.0, seed=0, fingerprint={"family": "BaseModel"})


def test_inversion_file_carries_a_checksum_and_an_altered_one_is_refused(tmp_path):
    path = save_inversion(_inversion(), tmp_path / "inv.safetensors")
    load_inversion(path)
    alter_tensor_bytes(path, 100)
    with pytest.raises(InversionFileError, match=r"inv\.safetensors is corrupt or was altered"):
        load_inversion(path)


def _instruction():
    k0 = {0: torch.randn(2, 8), 1: torch.randn(2, 16)}
    return ib.LearnedInstruction("make it blue", [1, 2], k0, {o: v.clone() for o, v in k0.items()})


def test_instruction_file_and_checkpoint_are_checked(tmp_path):
    inst = _instruction()
    inst.save(str(tmp_path / "i.safetensors"))
    ib.LearnedInstruction.load(str(tmp_path / "i.safetensors"))
    alter_tensor_bytes(tmp_path / "i.safetensors", 3)
    with pytest.raises(kf.ChecksumError, match=r"i\.safetensors"):
        ib.LearnedInstruction.load(str(tmp_path / "i.safetensors"))

    opt = torch.optim.AdamW(list(inst.parameters()), lr=1e-2)
    sum(p.sum() for p in inst.parameters()).backward()
    opt.step()
    settings = {"steps": 10, "lr": 1e-2, "seed": 0}
    ib.save_checkpoint(str(tmp_path / "c.partial"), inst, settings, 3, opt.state_dict())
    fresh = _instruction()
    step, state = ib.load_checkpoint(str(tmp_path / "c.partial"), fresh, settings)
    assert step == 3 and set(state["state"]) == set(opt.state_dict()["state"])
    for p, q in zip(inst.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    # only the step count changed: still resumable; anything else: a mismatch naming what differs
    assert ib.load_checkpoint(str(tmp_path / "c.partial"), _instruction(), {**settings, "steps": 50})[0] == 3
    with pytest.raises(ib.CheckpointMismatch, match="lr"):
        ib.load_checkpoint(str(tmp_path / "c.partial"), _instruction(), {**settings, "lr": 1e-3})
    alter_tensor_bytes(tmp_path / "c.partial", 0)
    with pytest.raises(kf.ChecksumError, match=r"c\.partial"):
        ib.load_checkpoint(str(tmp_path / "c.partial"), _instruction(), settings)


def test_converted_operator_is_checked(tmp_path):
    from photoops.kernels import pops_weights as pw
    from photoops.kernels.pops import OperatorPrior, PriorConfig

    cfg = PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16,
                      num_embeddings=77, additional_embeddings=4)
    sd = OperatorPrior(cfg).state_dict()
    sd = {k: v for k, v in sd.items() if k not in ("clip_mean", "clip_std")}
    torch.save(sd, tmp_path / "learned_prior.pth")
    from safetensors.torch import save_file

    save_file({"clip_mean": torch.zeros(1, 16), "clip_std": torch.ones(1, 16)}, str(tmp_path / "stats.safetensors"))
    dst = tmp_path / "op.safetensors"
    pw.convert(str(tmp_path / "learned_prior.pth"), str(dst), str(tmp_path / "stats.safetensors"),
               dtype=torch.float32, num_attention_heads=2)
    pw.load_operator(str(dst))
    meta = json.loads(json.dumps(kf.read_safetensors(dst)[1]))
    assert kf.CHECKSUM_KEY in meta
    alter_tensor_bytes(dst, 40)
    with pytest.raises(pw.PopsFileError, match=r"op\.safetensors is corrupt or was altered"):
        pw.load_operator(str(dst))
