"""Public API: transform inputs, f_px spellings, batches, forward's contract, info()."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

import depthpro_fast


def test_transform_pil_numpy_tensor_identical(tiny_model, tiny_image):
    _, transform = tiny_model
    hwc = tiny_image.permute(1, 2, 0).numpy()
    from_tensor = transform(tiny_image)
    from_numpy = transform(hwc)
    from_pil = transform(Image.fromarray(hwc))
    assert from_tensor.shape == (3, 240, 320) and from_tensor.dtype == torch.float32
    assert torch.equal(from_tensor, from_numpy)
    assert torch.equal(from_tensor, from_pil)
    # the official Normalize(0.5, 0.5) of ToTensor: 2 * (v / 255) - 1, range [-1, 1]
    expected = (tiny_image.float() / 255 - 0.5) / 0.5
    assert torch.equal(from_tensor, expected)


@pytest.mark.filterwarnings("ignore:dtype=torch.float16 on this CPU")  # expected
def test_transform_float_input_and_dtype():
    _, transform = depthpro_fast.load(None, config="tiny", device="cpu", dtype=torch.float16)
    x = torch.rand(3, 8, 9)
    out = transform(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (2 * x - 1).half())
    # float numpy arrays are taken as already in [0, 1] (torchvision ToTensor semantics)
    torch.testing.assert_close(transform(x.permute(1, 2, 0).numpy()), out)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((4, 4, 5), np.uint8), ValueError),
    (np.zeros((4, 4, 3, 1), np.uint8), ValueError),
    (np.zeros(4, np.uint8), ValueError),
    (torch.zeros(5, 4, 4, dtype=torch.uint8), ValueError),
    (np.zeros((4, 4, 3), np.int32), TypeError),
    ("image.jpg", TypeError),
    (np.full((4, 4, 3), 255.0, np.float32), ValueError),  # 0..255 floats
    (torch.full((3, 4, 4), -0.5), ValueError),
    (torch.full((3, 4, 4), float("nan")), ValueError),
])
def test_transform_rejects_bad_input(tiny_model, bad, error):
    _, transform = tiny_model
    with pytest.raises(error):
        transform(bad)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_transform_takes_gray_and_alpha_arrays_as_a_file_reads_them(tiny_model, tmp_path, mode):
    from depthpro_fast.io import load_image

    _, transform = tiny_model
    g = np.random.default_rng(0)
    channels = {"L": 1, "LA": 2, "RGBA": 4}[mode]
    array = g.integers(0, 256, (6, 7, channels), dtype=np.uint8)
    pil = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    assert pil.mode == mode
    pil.save(tmp_path / "x.png")
    from_file = transform(load_image(tmp_path / "x.png")[0])  # what the command line does
    assert torch.equal(transform(array), from_file)
    assert torch.equal(transform(pil), from_file)
    assert torch.equal(transform(torch.from_numpy(array).permute(2, 0, 1)), from_file)
    if channels == 1:  # HW without a channel axis, numpy and tensor
        assert torch.equal(transform(array[:, :, 0]), from_file)
        assert torch.equal(transform(torch.from_numpy(array[:, :, 0])), from_file)


def test_channels_first_numpy_and_channels_last_tensors_are_spotted(tiny_model):
    model, transform = tiny_model
    with pytest.raises(ValueError, match=r"looks channels-first \(CHW\)"):
        transform(np.zeros((3, 40, 60), np.uint8))
    with pytest.raises(ValueError, match=r"looks channels-last \(HWC\)"):
        transform(torch.zeros(40, 60, 3, dtype=torch.uint8))
    for hwc in (torch.zeros(400, 600, 3), torch.zeros(2, 400, 600, 3)):
        with pytest.raises(ValueError, match="looks channels-last") as err:
            model.infer(hwc)
        assert "got 400 channels" not in str(err.value)


@pytest.fixture(scope="module")
def given_runs(tiny_model, tiny_image):
    model, transform = tiny_model
    x = transform(tiny_image)
    return {kind: model.infer(x, f_px=f) for kind, f in
            (("float", 300.0), ("numpy", np.float32(300.0)), ("tensor", torch.tensor(300.0)))}


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_f_px_spellings_identical(given_runs, kind):
    ref = given_runs["float"]
    out = given_runs[kind]
    assert torch.equal(out["depth"], ref["depth"])
    assert torch.equal(out["focallength_px"], ref["focallength_px"])
    assert out["focallength_px"].shape == ()


def test_f_px_scales_inverse_depth(given_runs, expected_given):
    # with a given focal length: inverse depth = canonical * W / f_px (before the clamp)
    out = given_runs["float"]
    torch.testing.assert_close(out["depth"], expected_given["depth"], rtol=1e-5, atol=0)


def test_batch_of_two_equals_single_calls(tiny_model, tiny_image):
    model, transform = tiny_model
    a = transform(tiny_image)
    b = transform(tiny_image.flip(-1).roll(37, dims=-2))
    batch = model.infer(torch.stack([a, b]))
    singles = [model.infer(a), model.infer(b)]
    assert batch["depth"].shape == (2, 240, 320)
    assert batch["focallength_px"].shape == (2,)
    assert batch["fov_deg"].shape == (2,)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch["depth"][i], single["depth"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch["focallength_px"][i], single["focallength_px"],
                                   rtol=1e-5, atol=0)
    assert not torch.equal(singles[0]["depth"], singles[1]["depth"])
    # per-image given focal lengths in a batch
    given = model.infer(torch.stack([a, b]), f_px=torch.tensor([300.0, 600.0]))
    assert given["focallength_px"].tolist() == [300.0, 600.0]


@pytest.mark.parametrize("f_px, error", [
    (0.0, ValueError), (-5.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("300", TypeError), (torch.tensor([1.0, 2.0, 3.0]), ValueError), (True, TypeError),
])
def test_bad_f_px_rejected(tiny_model, f_px, error):
    model, _ = tiny_model
    with pytest.raises(error):
        model.infer(torch.zeros(3, 8, 8), f_px=f_px)


def test_forward_contract(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="1536"):
        model(torch.zeros(1, 3, 384, 384))
    with pytest.raises(TypeError, match="float32"):
        model(torch.zeros(1, 3, 1536, 1536, dtype=torch.float64))
    with pytest.raises(TypeError):
        model(np.zeros((1, 3, 1536, 1536), np.float32))


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(2, 8, 8), ValueError), (torch.zeros(1, 1, 3, 8, 8), ValueError),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), TypeError), (torch.zeros(3, 0, 8), ValueError),
    (np.zeros((3, 8, 8), np.float32), TypeError),
    (torch.full((3, 8, 8), 255.0), ValueError),  # not normalised
    (torch.full((3, 8, 8), float("inf")), ValueError),
])
def test_infer_rejects_bad_input(tiny_model, bad, error):
    model, _ = tiny_model
    with pytest.raises(error):
        model.infer(bad)


def test_random_weights_give_plausible_outputs():
    torch.manual_seed(0)
    model, transform = depthpro_fast.load(None, config="tiny", device="cpu")
    assert not model.training
    x = torch.rand(1, 3, 1536, 1536) * 2 - 1
    with torch.no_grad():
        cid, fov = model(x)
    assert cid.shape == (1, 1, 1536, 1536) and fov.shape == (1, 1, 1, 1)
    assert float(cid.mean()) > 0.01  # not an all-zero (depth clamped to 1e4 m) map
    assert 1.0 < float(fov) < 179.0


def test_info_reports_backends():
    report = depthpro_fast.info()
    assert report["torch"] == torch.__version__
    assert report["backends"]["reference"]["available"] is True
    for name in ("triton", "cuda"):
        b = report["backends"][name]
        assert b["available"] or b["why_not"]
    assert {"attention", "split_patches", "merge_patches"} <= set(report["ops"])
    text = depthpro_fast.report.format_info(report)
    assert "backends:" in text and "checkpoint search" in text


def test_explicit_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cuda backend may be available")
    with pytest.raises(RuntimeError, match="cuda"):
        depthpro_fast.ops.attention(*(torch.zeros(1, 1, 4, 8),) * 3, backend="cuda")
    with pytest.raises(ValueError, match="accepted"):
        depthpro_fast.ops.attention(*(torch.zeros(1, 1, 4, 8),) * 3, backend="fastest")


# ----------------------------------------------------------------------------------------------
# a backend that cannot run here is refused at load, with info()'s reason
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_refused_at_load_with_the_reason(backend, monkeypatch, tmp_path):
    from depthpro_fast import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU needs it
    cpu = torch.device("cpu")
    ok, why = backends.backend_status(backend, cpu)
    assert not ok and why
    with pytest.raises(backends.BackendUnavailableError) as err:
        # a checkpoint that does not exist: the backend is refused before any weight is read
        depthpro_fast.load(tmp_path / "missing.pt", config="tiny", device="cpu",
                           backend=backend)
    assert f"backend {backend!r} cannot run on cpu: {why}" in str(err.value)
    assert "backend='auto'" in str(err.value)
    assert isinstance(err.value, RuntimeError)
    with pytest.raises(backends.BackendUnavailableError) as err:
        depthpro_fast.load(None, config="tiny", device="cpu", fast={"epilogue_backend": backend})
    assert why in str(err.value)


def test_set_backend_refuses_and_keeps_the_old_one(tiny_model, monkeypatch):
    from depthpro_fast import backends

    model = copy.deepcopy(tiny_model[0])
    with pytest.raises(backends.BackendUnavailableError, match="'cuda' cannot run on cpu"):
        model.set_backend("cuda")
    assert model.backend == "reference"
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))
    model.set_backend("auto")  # always possible
    assert model.backend == "auto"


# ----------------------------------------------------------------------------------------------
# fp16 / bf16 on a CPU without their arithmetic: a warning, and the dtype kept
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, dtype, warns, suggests_bf16", [
    ({"avx2", "f16c"}, torch.float16, True, False),
    ({"avx2", "avx512_bf16"}, torch.float16, True, True),
    ({"avx2", "avx512_fp16", "avx512_bf16"}, torch.float16, False, False),
    ({"avx2"}, torch.bfloat16, True, False),
    ({"amx_bf16"}, torch.bfloat16, False, False),
    (None, torch.float16, False, False),  # unknown CPU: no claim
    ({"avx2"}, torch.float32, False, False),
])
def test_slow_cpu_dtype_warns_and_keeps_the_dtype(monkeypatch, flags, dtype, warns,
                                                  suggests_bf16):
    import warnings

    from depthpro_fast import api

    monkeypatch.setattr(api, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, transform = depthpro_fast.load(None, config="tiny", device="cpu", dtype=dtype)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert next(model.parameters()).dtype == dtype and transform.dtype == dtype  # not remapped
    if not warns:
        assert msgs == []
        return
    (msg,) = msgs
    name = "float16" if dtype == torch.float16 else "bfloat16"
    assert f"dtype=torch.{name} on this CPU: it has no {name} arithmetic" in msg
    assert "7x or more slower than in float32" in msg and "torch.float32" in msg
    assert ("torch.bfloat16 (native here)" in msg) == suggests_bf16


# ----------------------------------------------------------------------------------------------
# the fast path on CUDA with the default fp32: a warning naming the choices
# ----------------------------------------------------------------------------------------------


def test_fp32_fast_on_cuda_warning_names_the_choices():
    import warnings

    from depthpro_fast import api

    with pytest.warns(RuntimeWarning) as caught:
        api.warn_fp32_fast_on_gpu(torch.device("cuda", 0))
    (msg,) = [str(w.message) for w in caught]
    assert "fast=True on CUDA with the default fp32" in msg
    for choice in ("dtype=torch.float16", "dtype=torch.bfloat16", "dtype=torch.float32"):
        assert choice in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.warn_fp32_fast_on_gpu(torch.device("cpu"))  # a CPU: fp32 is its fast dtype


@pytest.mark.parametrize("dtype, fast, asked", [
    (None, True, True),              # the default dtype with the fast path: warn (on CUDA)
    (torch.float32, True, False),    # fp32 said explicitly: meant
    ("float32", True, False),
    (None, None, False),             # no fast path: the reference's fp32 is the drop-in
    (torch.bfloat16, True, False),
])
def test_load_warns_about_fp32_fast_only_when_the_dtype_was_defaulted(monkeypatch, dtype, fast,
                                                                      asked):
    from depthpro_fast import api

    calls = []
    monkeypatch.setattr(api, "warn_fp32_fast_on_gpu", lambda dev: calls.append(dev))
    kwargs = {} if dtype is None else {"dtype": dtype}
    model, transform = depthpro_fast.load(None, config="tiny", device="cpu", fast=fast, **kwargs)
    assert calls == ([torch.device("cpu")] if asked else [])
    want = torch.float32 if dtype in (None, "float32") else dtype
    assert next(model.parameters()).dtype == want and transform.dtype == want


def test_cpu_flags_are_read_from_proc_cpuinfo():
    from depthpro_fast import api

    flags = api.cpu_flags()
    if not os.path.exists("/proc/cpuinfo"):
        assert flags is None
    else:
        assert flags and ("avx2" in flags or "fp" in flags or "sse2" in flags)


# ----------------------------------------------------------------------------------------------
# f_px as a Python list, one per image, None for "estimate this one"
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_model():
    """A small random model: these tests are about f_px's handling, not about the network."""
    from tests.model_helpers import MICRO

    torch.manual_seed(5)
    return depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference")


@pytest.fixture(scope="module")
def pair(micro_model, tiny_image):
    model, transform = micro_model
    a = transform(tiny_image)
    b = transform(tiny_image.flip(-1).roll(37, dims=-2))
    return model, torch.stack([a, b]), [model.infer(a), model.infer(b)]


def test_f_px_list_equals_tensor_and_single_calls(pair):
    from depthpro_fast.inference import focal_length_tensor

    model, x, singles = pair
    cpu = torch.device("cpu")
    want = focal_length_tensor(torch.tensor([300.0, 600.0]), 2, cpu)
    for spelling in ([300.0, 600], (np.float32(300.0), torch.tensor(600.0)),
                     [np.array(300.0), np.array([600.0])]):
        assert torch.equal(focal_length_tensor(spelling, 2, cpu), want)
    assert focal_length_tensor([300.0], 2, cpu).flatten().tolist() == [300.0, 300.0]
    as_list = model.infer(x, f_px=[300.0, 600])
    as_tensor = model.infer(x, f_px=torch.tensor([300.0, 600.0]))
    for key in ("depth", "focallength_px", "fov_deg", "fov_deg_estimated"):
        assert torch.equal(as_list[key], as_tensor[key]), key
    for i, f in enumerate((300.0, 600.0)):
        single = model.infer(x[i], f_px=f)
        torch.testing.assert_close(as_list["depth"][i], single["depth"], rtol=1e-5, atol=1e-6)
        assert float(as_list["fov_deg"][i]) == float(single["fov_deg"])


def test_f_px_list_with_none_estimates_those_images(pair):
    model, x, singles = pair
    mixed = model.infer(x, f_px=[None, 600.0])
    # image 0: as without f_px; image 1: as with f_px=600
    torch.testing.assert_close(mixed["depth"][0], singles[0]["depth"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed["focallength_px"][0], singles[0]["focallength_px"],
                               rtol=1e-5, atol=0)
    assert float(mixed["fov_deg"][0]) == pytest.approx(float(singles[0]["fov_deg"]), rel=1e-5)
    given = model.infer(x[1], f_px=600.0)
    torch.testing.assert_close(mixed["depth"][1], given["depth"], rtol=1e-5, atol=1e-6)
    assert float(mixed["focallength_px"][1]) == 600.0
    assert float(mixed["fov_deg"][1]) == float(given["fov_deg"])  # the FOV of 600 px
    assert mixed["fov_deg_estimated"].shape == (2,)  # the FOV network ran for both
    all_none = model.infer(x, f_px=[None, None])
    torch.testing.assert_close(all_none["depth"], model.infer(x)["depth"], rtol=0, atol=0)


def test_f_px_list_with_none_runs_the_fov_network_on_the_fast_path(micro_model, tiny_image):
    model, transform = micro_model
    fast = copy.deepcopy(model).prepare_fast(True)
    x = torch.stack([transform(tiny_image)] * 2)
    mixed = fast.infer(x, f_px=[None, 600.0])  # needs the estimate for image 0
    assert "fov_deg_estimated" in mixed and float(mixed["focallength_px"][1]) == 600.0
    assert "fov_deg_estimated" not in fast.infer(x, f_px=[300.0, 600.0])  # skipped


@pytest.mark.parametrize("f_px, error, match", [
    ([300.0, 600.0, 900.0], ValueError, "f_px has 3 values but the batch has 2 images"),
    ([], ValueError, "empty list"),
    ([300.0, -1.0], ValueError, r"f_px\[1\] must be finite and > 0"),
    ([300.0, float("nan")], ValueError, r"f_px\[1\] must be finite and > 0"),
    ([300.0, "600"], TypeError, r"f_px\[1\] must be a number of pixels or None, got str"),
    ([True, 600.0], TypeError, r"f_px\[0\] must be a number"),
    ([np.array([1.0, 2.0]), 600.0], ValueError, r"f_px\[0\] must be one number, got shape"),
    ({"a": 1}, TypeError, "a list of numbers"),
])
def test_bad_f_px_lists_say_which_entry(pair, f_px, error, match):
    model, x, _ = pair
    with pytest.raises(error, match=match):
        model.infer(x, f_px=f_px)


def test_no_fov_network_needs_every_focal_length():
    from tests.model_helpers import MICRO

    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", use_fov=False)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pass f_px for every image"):
        model.infer(x, f_px=[None, 600.0])
    assert model.infer(x, f_px=[300.0, 600.0])["fov_deg"].shape == (2,)


# ----------------------------------------------------------------------------------------------
# load()'s default path: the fast engine on a CPU (exact up to fp32 rounding), reference on CUDA
# ----------------------------------------------------------------------------------------------


def test_load_defaults_to_the_fast_path_on_a_cpu_and_keeps_the_reference_when_asked():
    from tests.model_helpers import MICRO

    torch.manual_seed(3)
    default, transform = depthpro_fast.load(None, config=MICRO, device="cpu")
    assert default.fast_engine is not None and transform.dtype == torch.float32
    reference = copy.deepcopy(default).prepare_fast(False)
    off, _ = depthpro_fast.load(default.state_dict(), config=MICRO, device="cpu", fast=False)
    asked, _ = depthpro_fast.load(default.state_dict(), config=MICRO, device="cpu",
                                  backend="reference")
    assert off.fast_engine is None and asked.fast_engine is None
    assert asked.backend == "reference"
    x = transform(torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        fast_out, ref_out = default.infer(x), reference.infer(x)
    # the drop-in promise: the default's depth is the reference's up to float32 rounding
    rel = (fast_out["depth"] - ref_out["depth"]).abs() / ref_out["depth"].abs()
    assert float(rel.max()) < 1e-5
    assert torch.allclose(fast_out["focallength_px"], ref_out["focallength_px"], rtol=1e-5)


def test_default_fast_per_device_backend_and_fp8():
    from depthpro_fast.api import default_fast

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert default_fast(None, cpu) is True
    assert default_fast(None, cpu, backend="reference") is False
    assert default_fast(None, cuda) is False  # CUDA stays on the reference modules
    assert default_fast(None, cpu, fp8=True) is None  # fp8 turns it on itself
    for given in (True, False, {"streams": False}):
        assert default_fast(given, cpu) is given and default_fast(given, cuda) is given


def test_auto_dtype_is_predicts_choice(monkeypatch):
    from depthpro_fast import api, cpu

    assert api.auto_dtype(torch.device("cuda", 0)) == torch.float16
    for fastest in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(cpu, "fastest_cpu_dtype", lambda fastest=fastest: fastest)
        assert api.auto_dtype(torch.device("cpu")) == fastest
    from tests.model_helpers import MICRO

    model, transform = depthpro_fast.load(None, config=MICRO, device="cpu", dtype="auto")
    assert transform.dtype == torch.float32 and model.fast_engine is not None


@pytest.mark.parametrize("bf16", [True, False])
def test_fp8_on_cpu_warning_recommends_the_faster_dtype_of_this_cpu(monkeypatch, bf16):
    from depthpro_fast import api

    monkeypatch.setattr(api, "cpu_has_native", lambda dtype: bf16)
    with pytest.warns(RuntimeWarning) as caught:
        api.warn_fp8_cpu(torch.device("cpu"))
    msg = str(caught[0].message)
    if bf16:
        assert "Use torch.bfloat16 (this CPU has bf16 arithmetic" in msg
        assert "Use torch.float32" not in msg
    else:
        assert "Use torch.float32 on a CPU" in msg and "also emulates" in msg
