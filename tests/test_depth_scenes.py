"""The procedural depth set: depth checked against closed-form geometry written here."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from vitkit.data.depth_scenes import MAX_DEPTH, DepthScenesDataset, render_depth_scene
from vitkit.errors import ConfigError


def _scene(height=1.5, pitch_deg=10.0, fov_deg=60.0, wall=None, spheres=(), boxes=(), light=(0.3, 1.0, -0.2)):
    light = np.asarray(light, float)
    grey = np.array([150.0, 150.0, 150.0])
    return {
        "height": height, "pitch": math.radians(pitch_deg), "fov": math.radians(fov_deg),
        "light": light / np.linalg.norm(light), "sky": (np.zeros(3), np.zeros(3)),
        "ground": {"cell": 0.5, "colours": (grey * 0.8, grey * 1.2)}, "wall": wall,
        "spheres": list(spheres), "boxes": list(boxes),
    }


def _pixel_ray(u, v, size, pitch, fov):
    """Unit world direction of the ray through pixel centre (u, v), and the cosine to the optical axis.

    Built from angles: the ray is the optical axis turned by atan(a) right and atan(b) down in the
    camera's frame (x right, y up, z ahead), then the frame tilted nose-down by ``pitch`` about x.
    """
    f = (size / 2) / math.tan(fov / 2)
    a, b = (u + 0.5 - size / 2) / f, (v + 0.5 - size / 2) / f
    cam = np.array([a, -b, 1.0]) / math.sqrt(a * a + b * b + 1)
    tilt = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    return tilt @ cam, cam[2]


def test_ground_depth_is_the_ray_plane_intersection():
    size, h, pitch, fov = 65, 1.3, math.radians(12), math.radians(70)
    out = render_depth_scene(_scene(h, 12, 70), size)
    f = (size / 2) / math.tan(fov / 2)
    b = (np.arange(size) + 0.5 - size / 2) / f
    # In the image's centre column, the ray b below the optical axis falls at pitch + atan(b)
    # below the horizon and meets the ground at range h / sin(that); its z-depth is that range
    # times cos(atan(b)). Moving along a row turns the ray about the camera's vertical axis,
    # which keeps both its drop and its optical-axis component: z-depth is the same on a row.
    below = np.arctan(b) + pitch
    rng_centre = h / np.sin(np.where(below > 0, below, np.nan))  # range along the a = 0 ray
    z = rng_centre * np.cos(np.arctan(b))  # the same for every column: a scales x only
    want = np.where((below > 0) & (z <= MAX_DEPTH), z, 0.0)[:, None].repeat(size, 1)
    np.testing.assert_allclose(out["depth"], np.nan_to_num(want), rtol=1e-5, atol=1e-6)
    assert out["depth"].dtype == np.float32 and out["depth"].shape == (size, size)
    sky = out["surface"] == -1
    assert sky.any() and np.all(out["depth"][sky] == 0) and np.all(out["depth"][~sky & (want > 0)] > 0)
    assert np.any((out["surface"] == 0) & (out["depth"] == 0)), "ground beyond MAX_DEPTH must be invalid"


@pytest.mark.parametrize("u, v", [(32, 32), (40, 20), (10, 45)])
def test_sphere_depth_on_its_centre_ray(u, v):
    size, pitch, fov, distance, radius = 64, math.radians(8), math.radians(60), 4.0, 0.4
    ray, cos_axis = _pixel_ray(u, v, size, pitch, fov)
    centre = np.array([0.0, 1.5, 0.0]) + distance * ray
    out = render_depth_scene(_scene(1.5, 8, 60, spheres=[{"centre": centre, "radius": radius, "colour": np.ones(3)}]), size)
    # Along the ray through the centre the sphere starts at distance - radius; depth is that
    # range projected on the optical axis.
    assert out["surface"][v, u] == 2
    assert out["depth"][v, u] == pytest.approx((distance - radius) * cos_axis, rel=1e-6)


def test_box_front_face_and_its_outline():
    size, fov = 64, math.radians(60)
    box = {"lo": np.array([-1.0, 0.0, 5.0]), "hi": np.array([1.0, 2.0, 6.0]), "colour": np.ones(3)}
    out = render_depth_scene(_scene(1.0, 0.0, 60, boxes=[box]), size)
    # Level camera at x = 0, 1 m high: it sees only the front face z = 5, a rectangle whose
    # corners project to x / z * f, y / z * f about the image centre.
    f = (size / 2) / math.tan(fov / 2)
    c = np.arange(size) + 0.5 - size / 2
    cols = np.abs(c) < 1.0 / 5.0 * f
    rows = (c > -1.0 / 5.0 * f) & (c < 1.0 / 5.0 * f)  # 1 m above and below the eye
    want = rows[:, None] & cols[None, :]
    np.testing.assert_array_equal(out["surface"] == 2, want)
    np.testing.assert_allclose(out["depth"][want], 5.0, rtol=1e-6)


def test_wall_depth_and_nearer_objects_occlude_farther():
    size, pitch, fov = 64, math.radians(5), math.radians(60)
    wall = {"z": 9.0, "top": 3.0, "cell": 1.0, "colours": (np.ones(3) * 90, np.ones(3) * 160)}
    u, v = 30, 30
    ray, cos_axis = _pixel_ray(u, v, size, pitch, fov)
    eye = np.array([0.0, 1.5, 0.0])
    near = {"centre": eye + 3.0 * ray, "radius": 0.3, "colour": np.array([200.0, 0, 0])}
    far = {"centre": eye + 6.0 * ray, "radius": 0.8, "colour": np.array([0, 0, 200.0])}
    hidden = {"centre": np.array([0.0, 1.0, 11.0]), "radius": 0.9, "colour": np.ones(3)}  # behind the wall
    for spheres in ([near, far, hidden], [hidden, far, near]):
        out = render_depth_scene(_scene(1.5, 5, 60, wall=wall, spheres=spheres), size)
        ids = {id(s): 2 + k for k, s in enumerate(spheres)}
        assert out["surface"][v, u] == ids[id(near)]
        assert out["depth"][v, u] == pytest.approx((3.0 - 0.3) * cos_axis, rel=1e-6)
        assert out["image"][v, u, 0] > out["image"][v, u, 2]  # the near sphere's colour
        assert np.any(out["surface"] == ids[id(far)]) and not np.any(out["surface"] == ids[id(hidden)])
    # Where the wall is seen, its z-depth is its distance ahead: z = 9 m along the world z axis,
    # i.e. 9 / (z-component of the unit ray) along the ray, times the ray's cosine to the axis.
    seen = out["surface"] == 1
    assert seen.sum() > 100
    for vv, uu in zip(*np.nonzero(seen)):
        r, cos_a = _pixel_ray(uu, vv, size, pitch, fov)
        assert out["depth"][vv, uu] == pytest.approx(9.0 / r[2] * cos_a, rel=1e-6)


@pytest.mark.parametrize("occluder", ["sphere", "box"])
def test_shadow_falls_where_the_light_is_blocked(occluder):
    size, pitch, fov = 64, math.radians(20), math.radians(60)
    light = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
    sphere = {"centre": np.array([0.3, 0.6, 4.0]), "radius": 0.6, "colour": np.ones(3) * 200}
    box = {"lo": np.array([-0.2, 0.0, 3.5]), "hi": np.array([0.6, 1.0, 4.3]), "colour": np.ones(3) * 200}
    if occluder == "sphere":
        scene = _scene(1.5, 20, 60, spheres=[sphere], light=light)
    else:
        scene = _scene(1.5, 20, 60, boxes=[box], light=light)
    scene["ground"]["colours"] = (np.ones(3) * 200, np.ones(3) * 200)
    out = render_depth_scene(scene, size)
    # Reference: march from the ground point toward the light in 2 mm steps and ask whether a
    # step lands inside the object.
    steps = np.linspace(0.0, 4.0, 2001)[1:, None] * light
    shadow = np.zeros((size, size), bool)
    ground = out["surface"] == 0
    for v, u in zip(*np.nonzero(ground)):
        ray, _ = _pixel_ray(u, v, size, pitch, fov)
        pts = np.array([0.0, 1.5, 0.0]) + ray * (1.5 / -ray[1]) + steps
        if occluder == "sphere":
            inside = np.linalg.norm(pts - sphere["centre"], axis=1) < sphere["radius"]
        else:
            inside = np.all((pts > box["lo"]) & (pts < box["hi"]), axis=1)
        shadow[v, u] = inside.any()
    # Pixels on the shadow's rim are decided by where the march steps fall; leave them out.
    pad = np.pad(shadow, 1, mode="edge")
    rim = (pad[:-2, 1:-1] != shadow) | (pad[2:, 1:-1] != shadow) | (pad[1:-1, :-2] != shadow) | (pad[1:-1, 2:] != shadow)
    assert (shadow & ~rim).sum() > 10
    bright = out["image"].astype(float).mean(-1)
    for v in np.nonzero((shadow & ~rim).any(1))[0]:
        dark, lit = shadow[v] & ~rim[v] & ground[v], ground[v] & ~shadow[v] & ~rim[v]
        if lit.any():
            assert bright[v][dark].max() < 0.6 * bright[v][lit].min(), v


def test_random_scenes_are_valid_and_deterministic():
    ds = DepthScenesDataset(n=12, seed=4, img_size=48)
    assert ds.task == "depth" and ds.classes == [] and ds.num_classes == 0 and ds.format == "depth-scenes"
    for i in range(len(ds)):
        img, target, bad = ds.load(i)
        d = target["depth"]
        assert img.mode == "RGB" and img.size == (48, 48) and bad == []
        assert d.dtype == np.float32 and d.shape == (48, 48)
        assert np.all((d == 0) | ((d > 0.3) & (d <= MAX_DEPTH))) and (d > 0).mean() > 0.3
    again = DepthScenesDataset(n=12, seed=4, img_size=48)
    np.testing.assert_array_equal(ds.load(5)[1]["depth"], again.load(5)[1]["depth"])
    np.testing.assert_array_equal(np.asarray(ds.load(5)[0]), np.asarray(again.load(5)[0]))
    val = DepthScenesDataset(n=12, split="val", seed=4, img_size=48)
    train = {ds.render(i)["depth"].tobytes() for i in range(12)}
    assert not train & {val.render(i)["depth"].tobytes() for i in range(12)}
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds)).render(2)["image"], ds.render(2)["image"])
    assert DepthScenesDataset(n=1, img_size=32, in_chans=1).load(0)[0].mode == "L"
    assert ds.stats()["num_classes"] == 0 and ds.exclude(["depth-scenes[0]"]).bad_files == ["depth-scenes[0]"]
    with pytest.raises(ConfigError, match="split"):
        DepthScenesDataset(n=2, split="dev")
