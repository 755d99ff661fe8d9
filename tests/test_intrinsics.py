"""Full camera intrinsics (fx, fy, cx, cy): spellings and checks, the depth's focal length, the
point cloud of a known plane seen by a known camera, and the K stored in every output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from depthpro_fast import cli, intrinsics, outputs
from depthpro_fast.config import IMG_SIZE
from depthpro_fast.inference import infer
from tests.test_outputs import read_ply

# a camera with non-square pixels and an off-centre principal point, and a tilted plane
H, W = 48, 64
FX, FY, CX, CY = 70.0, 55.0, 25.25, 30.5
K = np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1]])
NORMAL = np.array([0.2, -0.3, 1.0]) / np.linalg.norm([0.2, -0.3, 1.0])
DISTANCE = 3.0  # metres from the camera centre to the plane: NORMAL . X = DISTANCE


def plane_inverse_depth(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 / z of the plane at pixel (u, v) (OpenCV convention, pixel centres at integers):
    X = z (ray), ray = ((u - cx) / fx, (v - cy) / fy, 1), NORMAL . X = DISTANCE."""
    ray_dot_n = NORMAL[0] * (u - CX) / FX + NORMAL[1] * (v - CY) / FY + NORMAL[2]
    return ray_dot_n / DISTANCE


def plane_depth() -> np.ndarray:
    v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                       indexing="ij")
    return (1.0 / plane_inverse_depth(u, v)).astype(np.float32)


def distances_to_plane(rows: np.ndarray) -> np.ndarray:
    points = np.stack([rows["x"], rows["y"], rows["z"]], 1).astype(np.float64)
    return points @ NORMAL - DISTANCE


# ----------------------------------------------------------------------------------------------
# the geometry path: a depth map of a known plane + K -> PLY points on that plane
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["tuple", "matrix"])
def test_ply_of_a_known_plane_lies_on_that_plane(tmp_path, spelling):
    depth = plane_depth()
    assert depth.min() > 1.0 and depth.max() < 10.0
    rgb = np.zeros((H, W, 3), np.uint8)
    given = (FX, FY, CX, CY) if spelling == "tuple" else K
    n = outputs.write_ply(tmp_path / "p.ply", depth, rgb, FX, intrinsics=given)
    header, rows = read_ply(tmp_path / "p.ply")
    assert n == H * W
    assert np.abs(distances_to_plane(rows)).max() < 1e-5  # metres (float32 points)
    assert "comment K 70.000000 0.000000 25.250000 0.000000 55.000000 30.500000 0.000000 " \
        "0.000000 1.000000" in header["lines"]
    # the same depth under the old assumptions (fx = fy, centred) is not that plane: the test
    # sees the principal point and fy
    outputs.write_ply(tmp_path / "c.ply", depth, rgb, FX)
    _, wrong = read_ply(tmp_path / "c.ply")
    assert np.abs(distances_to_plane(wrong)).max() > 0.05


def test_default_camera_is_the_image_centre_as_before(tmp_path):
    depth = plane_depth()
    rgb = np.zeros((H, W, 3), np.uint8)
    points, _ = outputs.point_cloud(depth, rgb, 50.0)
    given, _ = outputs.point_cloud(depth, rgb, 50.0, intrinsics=(50.0, 50.0, (W - 1) / 2,
                                                                 (H - 1) / 2))
    assert np.array_equal(points, given)
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")  # the formula of before
    np.testing.assert_array_equal(points[:, 0], ((u + 0.5 - W / 2) * depth / 50.0).ravel()
                                  .astype(np.float32))
    outputs.write_npz(tmp_path / "a.npz", depth, 50.0, 60.0)
    with np.load(tmp_path / "a.npz") as z:
        assert z["intrinsics"].dtype == np.float32
        assert z["intrinsics"].tolist() == [[50, 0, 31.5], [0, 50, 23.5], [0, 0, 1]]
    outputs.write_npz(tmp_path / "b.npz", depth, FX, 60.0, intrinsics=(FX, FY, CX, CY))
    with np.load(tmp_path / "b.npz") as z:
        np.testing.assert_array_equal(z["intrinsics"], K.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# the infer path, with a stub network whose output is the plane's canonical inverse depth
# ----------------------------------------------------------------------------------------------


class PlaneNetwork(nn.Module):
    """Stands in for DepthPro: returns the canonical inverse depth that, resized to (H, W) and
    scaled by W / fx (infer's arithmetic), is the plane's inverse depth. The plane's inverse
    depth is affine in the pixel coordinates, and bilinear downsizing (align_corners=False)
    reproduces an affine map exactly, so the stub's output is that map on the 1536 grid."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype for infer
        s = torch.arange(IMG_SIZE, dtype=torch.float64)
        u = (s + 0.5) * W / IMG_SIZE - 0.5  # the original pixel of each network column
        v = (s + 0.5) * H / IMG_SIZE - 0.5
        inverse = plane_inverse_depth(u.numpy()[None, :], v.numpy()[:, None])
        self.canonical = torch.from_numpy(inverse * FX / W).float()[None, None]
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor, need_fov: bool = True):
        self.calls.append(need_fov)
        fov = torch.full((x.shape[0], 1, 1, 1), 50.0) if need_fov else None
        return self.canonical.expand(x.shape[0], 1, IMG_SIZE, IMG_SIZE), fov


def test_infer_with_intrinsics_gives_the_plane_and_its_point_cloud(tmp_path):
    net = PlaneNetwork()
    x = torch.zeros(3, H, W)
    out = infer(net, x, intrinsics=(FX, FY, CX, CY))
    assert net.calls == [False]  # every image has its focal length: no FOV network
    np.testing.assert_allclose(out["depth"].numpy(), plane_depth(), rtol=2e-5)
    assert float(out["focallength_px"]) == FX  # the depth's focal length is fx
    np.testing.assert_allclose(float(out["fov_deg"]), np.degrees(2 * np.arctan(W / 2 / FX)),
                               rtol=1e-6)
    assert out["intrinsics"].shape == (3, 3)
    np.testing.assert_array_equal(out["intrinsics"].numpy(), K.astype(np.float32))
    outputs.write_ply(tmp_path / "p.ply", out["depth"], np.zeros((H, W, 3), np.uint8),
                      float(out["focallength_px"]), intrinsics=out["intrinsics"].numpy())
    _, rows = read_ply(tmp_path / "p.ply")
    assert np.abs(distances_to_plane(rows)).max() < 1e-4  # metres, at 2.6-3.3 m


def test_infer_intrinsics_spellings_and_batches():
    net = PlaneNetwork()
    x = torch.zeros(3, H, W)
    ref = infer(net, x, intrinsics=(FX, FY, CX, CY))
    for spelling in (K, K.tolist(), torch.tensor(K), torch.tensor([FX, FY, CX, CY]),
                     [(FX, FY, CX, CY)], np.array([[FX, FY, CX, CY]])):
        out = infer(net, x, intrinsics=spelling)
        assert torch.equal(out["depth"], ref["depth"])
        assert torch.equal(out["intrinsics"], ref["intrinsics"])
    other = (2 * FX, FY, CX, CY)
    both = infer(net, torch.stack([x, x]), intrinsics=[(FX, FY, CX, CY), other])
    assert both["intrinsics"].shape == (2, 3, 3) and both["focallength_px"].tolist() == [
        FX, 2 * FX]
    torch.testing.assert_close(both["depth"][0], ref["depth"])
    torch.testing.assert_close(both["depth"][1], 2 * ref["depth"], rtol=1e-5, atol=0)
    # without intrinsics: the focal length used, on both axes, and the image centre
    est = infer(net, x, f_px=80.0)
    assert est["intrinsics"].tolist() == [[80, 0, 31.5], [0, 80, 23.5], [0, 0, 1]]


@pytest.mark.parametrize("bad, error, match", [
    ((FX, -1.0, CX, CY), ValueError, "fx and fy must be > 0"),
    ((FX, FY, CX, float("nan")), ValueError, "cy must be finite"),
    ((FX, FY, CX), ValueError, "got shape"),
    ([[FX, 1.0, CX], [0, FY, CY], [0, 0, 1]], ValueError, "no skew"),
    ([[FX, 0, CX], [0, FY, CY], [0, 0, 2]], ValueError, "no skew"),
    ([(FX, FY, CX, CY)] * 3, ValueError, "3 cameras but the batch has 1 image"),
    ((FX, FY, CX, True), TypeError, "cy must be a number"),
])
def test_bad_intrinsics_are_refused_with_what_is_accepted(bad, error, match):
    with pytest.raises(error, match=match):
        infer(PlaneNetwork(), torch.zeros(3, H, W), intrinsics=bad)


def test_f_px_and_intrinsics_together_are_refused():
    with pytest.raises(ValueError, match="pass f_px or intrinsics, not both"):
        infer(PlaneNetwork(), torch.zeros(3, H, W), f_px=FX, intrinsics=(FX, FY, CX, CY))


def test_parse_command_line_intrinsics():
    assert intrinsics.parse(" 70, 55,25.25 ,30.5") == (FX, FY, CX, CY)
    for bad in ("70,55,25", "70,55,a,b", "", "70 55 25 30"):
        with pytest.raises(ValueError, match="four numbers fx,fy,cx,cy"):
            intrinsics.parse(bad)
    with pytest.raises(ValueError, match="--intrinsics: fx and fy must be > 0"):
        intrinsics.parse("0,55,25,30")


# ----------------------------------------------------------------------------------------------
# predict --intrinsics: every output stores K, the depth uses fx
# ----------------------------------------------------------------------------------------------


class PlaneModel(PlaneNetwork):
    """The stub as ``predict`` uses a model: ``infer``, a backend, no fast engine."""

    backend = "reference"
    fast_engine = None

    def infer(self, x, f_px=None, **kw):
        return infer(self, x, f_px, **kw)


def test_predict_intrinsics_go_into_every_output(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from depthpro_fast import api
    from depthpro_fast.inference import Transform

    monkeypatch.setattr(api, "load", lambda *a, **kw: (PlaneModel(), Transform("cpu")))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a.png")
    common = ["predict", str(tmp_path / "a.png"), "--random-weights", "--config", "tiny",
              "--device", "cpu", "--save", "npz,ply", "--quiet"]
    assert cli.main([*common, "-o", str(tmp_path / "k"), "--intrinsics",
                     f"{FX},{FY},{CX},{CY}"]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "f"), "--f-px", str(FX)]) == 0
    with np.load(tmp_path / "k" / "a.npz") as z, np.load(tmp_path / "f" / "a.npz") as f:
        np.testing.assert_array_equal(z["intrinsics"], K.astype(np.float32))
        assert z["focallength_px"] == np.float32(FX) and str(z["focallength_source"]) == "given"
        np.testing.assert_allclose(z["depth"], plane_depth(), rtol=2e-5)
        assert np.array_equal(z["depth"], f["depth"])  # the depth is fx's
        assert f["intrinsics"][0, 2] == (W - 1) / 2 and f["intrinsics"][1, 1] == FX
    header, rows = read_ply(tmp_path / "k" / "a.ply")
    assert any(line.startswith("comment K 70.000000 0.000000 25.250000") for line in
               header["lines"])
    assert np.abs(distances_to_plane(rows)).max() < 1e-4  # the plane, through the command
    _, centred = read_ply(tmp_path / "f" / "a.ply")
    assert np.abs(distances_to_plane(centred)).max() > 0.05
    capsys.readouterr()
    assert cli.main([*common, "-o", str(tmp_path / "x"), "--f-px", "70",
                     "--intrinsics", "70,55,25,30"]) == 1
    assert "--f-px and --intrinsics both give the focal length" in capsys.readouterr().err
    assert cli.main([*common, "-o", str(tmp_path / "x"), "--intrinsics", "70,55"]) == 1
    assert "--intrinsics must be four numbers" in capsys.readouterr().err
