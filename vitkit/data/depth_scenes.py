"""Built-in procedural depth data: rendered rooms-and-yards with exact metric depth.

Each image is a small world seen by a pinhole camera at standing height, pitched down: a
checkered ground plane, sometimes a back wall, and boxes and spheres resting on the ground.
Depth comes from casting one ray per pixel and keeping the nearest hit, so it is exact: the
label of a pixel is the distance from the camera along its optical axis (z-depth, the
convention of depth datasets and of DPT) in metres. Sky and anything beyond ``max_depth`` are
0 (invalid). The image carries the cues a monocular model learns from: perspective size,
occlusion, Lambertian shading with cast shadows, objects touching the ground, the checker's
texture gradient and haze with distance.

Like ``shapes``, image ``index`` is fixed by ``(seed, split, index)``, train and val never
share a random stream, and nothing is stored. :func:`render_depth_scene` renders a scene
described by hand (see :func:`sample_depth_scene` for its keys), for tests and figures.
"""

from __future__ import annotations

import math

import numpy as np

from .scenes import ProceduralDataset

MAX_DEPTH = 60.0  # metres; farther ground is labelled invalid, like a range sensor's limit
_AMBIENT = 0.35
_HAZE = 45.0  # metres over which haze takes 1 - 1/e of a surface's colour
_EPS = 1e-4  # shadow rays start this far off the surface, so it does not shadow itself


def sample_depth_scene(rng: np.random.Generator) -> dict:
    """Draw a random scene description.

    Keys: ``height`` (camera above the ground, m), ``pitch`` (downward tilt, rad), ``fov``
    (horizontal field of view, rad), ``light`` (unit vector toward the light), ``sky``
    ((horizon, zenith) RGB), ``ground`` ({``cell`` m, ``colours``}), ``wall`` (None or {``z``
    m ahead, ``top`` m, ``cell``, ``colours``}), ``spheres`` ([{``centre`` xyz, ``radius``,
    ``colour``}]) and ``boxes`` ([{``lo`` xyz, ``hi`` xyz, ``colour``}]). World axes: x right,
    y up, z forward; the camera stands at (0, height, 0) looking along +z.
    """

    def colour(lo=30, hi=230):
        return rng.uniform(lo, hi, 3).astype(np.float32)

    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.6, 1.2), rng.uniform(-0.6, 0.3)])
    scene = {
        "height": float(rng.uniform(1.0, 2.0)),
        "pitch": math.radians(rng.uniform(5, 25)),
        "fov": math.radians(rng.uniform(50, 75)),
        "light": light / np.linalg.norm(light),
        "sky": (np.array([200, 215, 230], np.float32) + rng.normal(0, 10, 3), colour(60, 160) * [0.5, 0.7, 1.2]),
        "ground": {"cell": float(rng.uniform(0.3, 1.2)), "colours": (colour(), colour())},
        "wall": None,
        "spheres": [],
        "boxes": [],
    }
    far = MAX_DEPTH
    if rng.random() < 0.5:
        far = float(rng.uniform(8, 22))
        scene["wall"] = {"z": far, "top": float(rng.uniform(2.5, 8)), "cell": float(rng.uniform(0.4, 1.5)),
                         "colours": (colour(), colour())}
    placed: list[tuple[float, float, float]] = []  # (x, z, footprint radius)
    for _ in range(int(rng.integers(1, 7))):
        for _try in range(10):
            size = float(rng.uniform(0.25, 0.9))
            z = float(rng.uniform(2.5, min(14.0, far - 1.5 * size)))
            half = z * math.tan(scene["fov"] / 2)
            x = float(rng.uniform(-0.9, 0.9) * half)
            if all((x - px) ** 2 + (z - pz) ** 2 > (size + pr) ** 2 for px, pz, pr in placed):
                break
        else:
            continue
        placed.append((x, z, size * 1.42))
        if rng.random() < 0.5:
            scene["spheres"].append({"centre": np.array([x, size, z]), "radius": size, "colour": colour()})
        else:
            h = float(rng.uniform(0.4, 2.2)) * size
            w = size * rng.uniform(0.6, 1.0, 2)
            scene["boxes"].append({"lo": np.array([x - w[0], 0.0, z - w[1]]), "hi": np.array([x + w[0], h, z + w[1]]),
                                   "colour": colour()})
    return scene


def camera_rays(scene: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera origin (3,) and one ray per pixel centre, (size, size, 3), scaled so the optical-axis
    component is 1: a hit at ray parameter ``t`` is ``t`` metres deep (z-depth)."""
    f = size / (2 * math.tan(scene["fov"] / 2))
    c = (np.arange(size, dtype=np.float64) + 0.5 - size / 2) / f
    a, b = np.meshgrid(c, c)  # a: rightward, b: downward, per pixel
    cp, sp = math.cos(scene["pitch"]), math.sin(scene["pitch"])
    # a * right - b * up + forward, with the camera pitched nose-down about the x axis.
    d = np.stack([a, -b * cp - sp, -b * sp + cp], axis=-1)
    return np.array([0.0, scene["height"], 0.0]), d


def _window(scene: dict, size: int, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns holding every pixel whose ray can meet the box [lo, hi] (all, if it reaches
    behind the camera): objects are small, so they are ray-cast only there."""
    f = size / (2 * math.tan(scene["fov"] / 2))
    cp, sp = math.cos(scene["pitch"]), math.sin(scene["pitch"])
    corners = np.stack(np.meshgrid(*zip(lo, hi)), -1).reshape(-1, 3) - (0.0, scene["height"], 0.0)
    z = corners[:, 1] * -sp + corners[:, 2] * cp
    if np.any(z < 1e-6):
        return slice(0, size), slice(0, size)
    u = f * corners[:, 0] / z + size / 2
    v = -f * (corners[:, 1] * cp + corners[:, 2] * sp) / z + size / 2
    rows = slice(max(math.floor(v.min()) - 1, 0), max(min(math.ceil(v.max()) + 1, size), 0))
    cols = slice(max(math.floor(u.min()) - 1, 0), max(min(math.ceil(u.max()) + 1, size), 0))
    return rows, cols


def _hit_sphere(o, d, centre, radius):
    oc = o - centre
    A = np.einsum("...i,...i->...", d, d)
    B = np.einsum("...i,...i->...", d, oc)
    C = np.einsum("...i,...i->...", oc, oc) - radius * radius
    disc = B * B - A * C
    with np.errstate(invalid="ignore"):
        t = (-B - np.sqrt(disc)) / A
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _hit_box(o, d, lo, hi):
    """Slab test; also the axis (0..2) of the face entered, for the normal."""
    t_in, t_out, axis = -np.inf, np.inf, 0
    for i in range(3):  # per axis: numpy reduces over a last axis of length 3 slowly
        di = d[..., i]
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (lo[i] - o[..., i]) / di, (hi[i] - o[..., i]) / di
        # A ray parallel to a slab is inside it for all t or for none.
        inside = (o[..., i] >= lo[i]) & (o[..., i] <= hi[i])
        near = np.where(di == 0, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
        far = np.where(di == 0, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
        axis = np.where(near > t_in, i, axis)
        t_in, t_out = np.maximum(t_in, near), np.minimum(t_out, far)
    return np.where((t_out >= t_in) & (t_in > 0), t_in, np.inf), axis


def _objects(scene):
    """``(kind, object, lo, hi)`` for spheres then boxes; [lo, hi] bounds the object."""
    out = [("sphere", o, o["centre"] - o["radius"], o["centre"] + o["radius"]) for o in scene["spheres"]]
    return out + [("box", o, np.asarray(o["lo"], float), np.asarray(o["hi"], float)) for o in scene["boxes"]]


def _shadowed(q: np.ndarray, light: np.ndarray, objects) -> np.ndarray:
    """Which points ``q`` (M, 3) see an object between them and the (distant) light."""
    blocked = np.zeros(len(q), bool)
    for kind, obj, lo, hi in objects:
        if kind == "sphere":
            blocked |= np.isfinite(_hit_sphere(q, light, obj["centre"], obj["radius"]))
            continue
        # Only points whose light ray passes the box's bounding sphere need the slab test.
        centre, radius = (lo + hi) / 2, np.linalg.norm(hi - lo) / 2
        w = centre - q
        along = w @ light
        near = (along > -radius) & (np.einsum("ij,ij->i", w, w) - along * along < radius * radius)
        idx = np.flatnonzero(near)
        blocked[idx] |= np.isfinite(_hit_box(q[idx], light, lo, hi)[0])
    return blocked


def _checker(u, v, cell, footprint):
    """Checker in [0, 1], faded toward grey where a pixel spans more than a cell (no moire)."""
    check = (np.floor(u / cell) + np.floor(v / cell)) % 2
    contrast = np.clip(1.0 - footprint / cell, 0.0, 1.0)
    return 0.5 + (check - 0.5) * contrast


def render_depth_scene(scene: dict, size: int = 128, max_depth: float = MAX_DEPTH) -> dict:
    """Ray-cast ``scene`` at ``size`` x ``size`` pixels.

    Returns ``{image: uint8 (H, W, 3), depth: float32 (H, W) metres (0 = sky or beyond
    max_depth), surface: int16 (H, W)}``; ``surface`` says what each pixel sees: -1 sky, 0 the
    ground, 1 the wall, 2 + k the k-th object (spheres first, then boxes).
    """
    o, d = camera_rays(scene, size)
    t = np.full((size, size), np.inf)
    surface = np.full((size, size), -1, np.int16)
    normal = np.zeros((size, size, 3), np.float32)
    with np.errstate(divide="ignore"):
        tg = np.where(d[..., 1] < 0, -o[1] / d[..., 1], np.inf)
    closer = tg < t
    t[closer], surface[closer], normal[closer] = tg[closer], 0, (0.0, 1.0, 0.0)
    wall = scene.get("wall")
    if wall is not None:
        with np.errstate(divide="ignore"):
            tw = np.where(d[..., 2] > 0, (wall["z"] - o[2]) / d[..., 2], np.inf)
        yw = o[1] + tw * d[..., 1]
        tw = np.where((yw >= 0) & (yw <= wall["top"]), tw, np.inf)
        closer = tw < t
        t[closer], surface[closer], normal[closer] = tw[closer], 1, (0.0, 0.0, -1.0)
    objects = _objects(scene)
    for k, (kind, obj, lo, hi) in enumerate(objects):
        win = _window(scene, size, lo, hi)
        dw, tw, sw, nw = d[win], t[win], surface[win], normal[win]  # views: writes land in the full maps
        if kind == "sphere":
            tk = _hit_sphere(o, dw, obj["centre"], obj["radius"])
            closer = tk < tw
            n = (o + tk[closer][:, None] * dw[closer] - obj["centre"]) / obj["radius"]
        else:
            tk, axis = _hit_box(o, dw, lo, hi)
            closer = tk < tw
            dc, ax = dw[closer], axis[closer]
            n = np.zeros((len(ax), 3))
            n[np.arange(len(ax)), ax] = -np.sign(dc[np.arange(len(ax)), ax])
        tw[closer], sw[closer], nw[closer] = tk[closer], 2 + k, n
    hit = surface >= 0
    th = np.where(hit, t, 0.0)
    p = o + th[..., None] * d
    inv_len = 1.0 / np.sqrt(np.einsum("...i,...i->...", d, d))
    dist = (th * inv_len).astype(np.float32)  # range along the ray

    # Albedo: textured ground and wall, plain objects.
    f = size / (2 * math.tan(scene["fov"] / 2))
    cos_in = np.abs(np.einsum("...i,...i->...", normal, d)) * inv_len
    footprint = dist / f / np.maximum(cos_in, 0.05)  # metres one pixel spans on the surface
    albedo = np.zeros((size, size, 3), np.float32)
    planes = [(0, scene["ground"], 2)] + ([(1, wall, 1)] if wall is not None else [])
    for sid, plane, axis in planes:  # ground: checker in x-z; wall: in x-y
        m = surface == sid
        tex = _checker(p[m][:, 0], p[m][:, axis], plane["cell"], footprint[m])[:, None]
        albedo[m] = plane["colours"][0] * (1 - tex) + plane["colours"][1] * tex
    for k, (_, obj, _, _) in enumerate(objects):
        albedo[surface == 2 + k] = obj["colour"]

    # Lambertian light with hard shadows cast by the objects.
    light = np.asarray(scene["light"], np.float64)
    lit = np.clip(normal @ light.astype(np.float32), 0.0, None)
    lit_pix = np.flatnonzero(hit & (lit > 0))
    if len(lit_pix) and objects:
        q = p.reshape(-1, 3)[lit_pix] + _EPS * normal.reshape(-1, 3)[lit_pix]
        lit.reshape(-1)[lit_pix[_shadowed(q, light, objects)]] = 0.0
    colour = albedo * (_AMBIENT + (1 - _AMBIENT) * lit)[..., None]

    horizon, zenith = (np.asarray(c, np.float32) for c in scene["sky"])
    haze = np.exp(-dist / _HAZE)[..., None]
    colour = colour * haze + horizon * (1 - haze)
    sky = ~hit
    elevation = np.clip(d[sky][:, 1] * inv_len[sky] * 2.5, 0, 1)[:, None].astype(np.float32)
    colour[sky] = horizon * (1 - elevation) + zenith * elevation
    depth = np.where(hit & (t <= max_depth), t, 0.0).astype(np.float32)
    return {"image": np.clip(np.rint(colour), 0, 255).astype(np.uint8), "depth": depth, "surface": surface}


def render_random_depth_scene(rng: np.random.Generator, size: int = 128) -> dict:
    """:func:`sample_depth_scene` then :func:`render_depth_scene`."""
    return render_depth_scene(sample_depth_scene(rng), size)


class DepthScenesDataset(ProceduralDataset):
    """Seeded procedural depth scenes; ``load(i)`` is ``(image, {"depth": float32 (H, W) metres}, [])``.

    The arguments are those of :class:`vitkit.data.scenes.ScenesDataset` (``n``, ``split``,
    ``seed``, ``img_size``, ``in_chans``). Depth is z-depth in metres; 0 marks sky and ground
    beyond :data:`MAX_DEPTH` (invalid). ``classes`` is empty.
    """

    def __init__(self, n: int = 2000, split: str = "train", seed: int = 0, img_size: int = 128, in_chans: int = 3):
        super().__init__(
            render_random_depth_scene, n=n, split=split, seed=seed, img_size=img_size, in_chans=in_chans,
            classes=[], task="depth", format="depth-scenes",
        )

    def _target(self, out: dict) -> dict:
        return {"depth": out["depth"]}
