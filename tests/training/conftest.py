"""Fixtures of the training tests: one intra-op thread, a small data set of real photos,
and tiny training configs.

Everything runs on the CPU with tiny images (32 x 32 crops, 16 x 16 local patches, holes
of 8-12 px) cut from real photographs (scikit-image's samples written as jpg, png and
webp).
"""

import cv2
import pytest
import torch

from glcic_fast.training.config import TrainConfig

TINY = dict(image_size=32, local_size=16, hole_range=(8, 12), disc_channels=(8, 16, 16, 16, 16, 16))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads that wait for each other
    make these tiny steps 10-30 times slower (the subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- photographs -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A small data set of real photos, nested, in jpg, png and webp (plus files to ignore)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    names = {"astronaut": "astronaut.jpg", "coffee": "nested/coffee.png", "chelsea": "chelsea.webp",
             "rocket": "nested/deeper/rocket.JPG", "camera": "camera.png", "immunohistochemistry": "ihc.jpeg"}
    for name, rel in names.items():
        image = getattr(skimage.data, name)()
        h, w = image.shape[:2]
        scale = 64 / min(h, w)  # small files: the augmentation rescales to 32-48 anyway
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if image.ndim == 3:
            image = image[:, :, ::-1]
        assert cv2.imwrite(str(root / rel), image)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return str(root)


@pytest.fixture
def tiny_config():
    """``tiny_config(data, out, **overrides)``: a TrainConfig of a few tiny steps on the CPU."""
    return _tiny_config


def _tiny_config(data, out, **overrides) -> TrainConfig:
    kw = dict(TINY, phase_steps=(2, 2, 2), batch_size=2, device="cpu", workers=0, checkpoint_every=1, keep=2,
              log_every=1, tensorboard=False, progress=False, seed=0)
    kw.update(overrides)
    return TrainConfig(str(data), str(out), **kw)
