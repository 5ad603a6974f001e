"""INVERSION object: validation, replay checks, safetensors round trip, bad files."""
import pytest
import torch

from photoops.kernels.inversion_state import (Inversion, InversionFileError, InversionMismatchError, load_inversion,
                                              save_inversion)


def _inv(method="ddpm", steps=5, shape=(1, 4, 8, 8), skip=1):
    torch.manual_seed(0)
    sig = torch.linspace(10, 0.03, steps + 1, dtype=torch.float64)
    return Inversion(method=method, sigmas=sig, x_start=torch.randn(shape), skip=skip,
                     noises=torch.randn(steps, *shape) if method != "ddim" else None,
                     eta=torch.ones(steps), source_cfg=3.5, seed=7,
                     fingerprint={"family": "BaseModel", "weights": "abc123"},
                     source={"positive": torch.randn(1, 77, 8)}, info={"prompt": "a red circle"})


def test_round_trip_is_exact(tmp_path):
    inv = _inv()
    p = save_inversion(inv, tmp_path / "a.safetensors")
    back = load_inversion(p)
    assert back.method == "ddpm" and back.skip == 1 and back.seed == 7 and back.source_cfg == 3.5
    assert torch.equal(back.sigmas, inv.sigmas) and torch.equal(back.x_start, inv.x_start)
    assert torch.equal(back.noises, inv.noises) and torch.equal(back.source["positive"], inv.source["positive"])
    assert back.fingerprint == inv.fingerprint and back.info == inv.info
    assert not list(tmp_path.glob("*.part"))


def test_validation_errors():
    with pytest.raises(ValueError, match="unknown inversion method"):
        _inv(method="dpm")
    with pytest.raises(ValueError, match="needs its per-step noise maps"):
        Inversion(method="ddpm", sigmas=torch.tensor([2.0, 1.0]), x_start=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="strictly decreasing"):
        Inversion(method="ddim", sigmas=torch.tensor([1.0, 2.0]), x_start=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="skip must be"):
        _inv(skip=5)


def test_replay_mismatches_are_named():
    inv = _inv()
    inv.check_replay(inv.sigmas.float(), (1, 4, 8, 8), {"family": "BaseModel", "weights": "abc123"})
    with pytest.raises(InversionMismatchError, match="sigma mismatch: the inversion was made with 5 steps"):
        inv.check_replay(torch.linspace(10, 0.03, 7))
    with pytest.raises(InversionMismatchError, match="latent size mismatch"):
        inv.check_replay(inv.sigmas, (1, 4, 16, 16))
    with pytest.raises(InversionMismatchError, match="batch mismatch"):
        inv.check_replay(inv.sigmas, (2, 4, 8, 8))
    with pytest.raises(InversionMismatchError, match="model mismatch \\(weights\\)"):
        inv.check_replay(inv.sigmas, (1, 4, 8, 8), {"family": "BaseModel", "weights": "zzz"})


def test_corrupt_truncated_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    p = save_inversion(_inv(), tmp_path / "good.safetensors")
    data = open(p, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InversionFileError, match="cannot read trunc.safetensors"):
        load_inversion(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InversionFileError):
        load_inversion(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(InversionFileError, match="not a PhotoOps inversion file"):
        load_inversion(tmp_path / "lora.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "v9.safetensors"),
              metadata={"photoops_inversion": '{"format_version": 9}'})
    with pytest.raises(InversionFileError, match="version 9"):
        load_inversion(tmp_path / "v9.safetensors")
    save_file({"sigmas": torch.tensor([2.0, 1.0]), "x_start": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "bad.safetensors"),
              metadata={"photoops_inversion": '{"format_version": 1, "method": "ddpm", "skip": 0, '
                                              '"source_cfg": 1, "seed": 0}'})
    with pytest.raises(InversionFileError, match="inconsistent inversion"):
        load_inversion(tmp_path / "bad.safetensors")
