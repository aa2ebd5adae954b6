"""MVDream's multi-view UNet (threed/guidance/mvdream_unet.py) against bytedance/MVDream's own code.

The data in tests/data/mvdream/ was made once by tests/data/mvdream/make_fidelity.py: the reference's
MultiViewUNetModel (its plain softmax attention, no xformers) on a tiny configuration (tiny-unet.yaml: two
levels, attention at the first, 16 channels per head, camera_dim 16) with random weights (its own
initialisation, seed 0, plus 0.05 N(0, 1) on every parameter so no zero-initialised layer hides a wrong
mapping), stored in the checkpoint's key layout (tiny-unet.safetensors), and its outputs for fixed inputs in
float32 on a CPU: two objects of num_frames = 4 views at two timesteps, their cameras from the reference's
get_camera/normalize_camera, with and without the camera (tiny-unet-io.safetensors). threed's module loads
the same file through its checkpoint mapping and must give the same outputs within 1e-5 (measured: 1.7e-6,
outputs up to 2.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from threed.guidance.mvdream_unet import convert_unet, load_unet, unet_config, unused_unet_keys

DATA = Path(__file__).parent / "data" / "mvdream"


@pytest.fixture(scope="module")
def tiny() -> tuple[dict, dict, dict]:
    params = yaml.safe_load((DATA / "tiny-unet.yaml").read_text())["unet_config"]["params"]
    return params, load_file(DATA / "tiny-unet.safetensors"), load_file(DATA / "tiny-unet-io.safetensors")


def test_every_reference_weight_maps_onto_the_module(tiny):
    params, state, _ = tiny
    converted = convert_unet(state, unet_config(params))
    assert unused_unet_keys(state, converted) == []
    model = load_unet(state, params)
    assert set(converted) == set(model.state_dict())
    assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())


def test_outputs_match_the_reference_implementation(tiny):
    params, state, io = tiny
    model = load_unet(state, params)
    with torch.no_grad():
        out = model(io["x"], io["timesteps"], io["context"], camera=io["camera"], num_frames=4)
        no_camera = model(io["x"], io["timesteps"], io["context"], num_frames=4)
        per_view = model(io["x"], io["timesteps"], io["context"], camera=io["camera"], num_frames=1)
    assert out.shape == io["out"].shape
    assert (out - io["out"]).abs().max() < 1e-5
    assert (no_camera - io["out_no_camera"]).abs().max() < 1e-5
    # The data exercises both changes: views attending to each other and the camera move the output.
    assert (per_view - io["out"]).abs().max() > 1e-2
    assert (io["out_no_camera"] - io["out"]).abs().max() > 1e-2


def test_views_of_one_object_attend_only_to_each_other(tiny):
    """Changing the second object's views leaves the first object's outputs as they were."""
    params, state, io = tiny
    model = load_unet(state, params)
    x = io["x"].clone()
    x[4:] = torch.randn_like(x[4:])
    with torch.no_grad():
        a = model(io["x"], io["timesteps"], io["context"], camera=io["camera"], num_frames=4)
        b = model(x, io["timesteps"], io["context"], camera=io["camera"], num_frames=4)
    assert torch.allclose(a[:4], b[:4], atol=1e-6)
    assert not torch.allclose(a[4:], b[4:], atol=1e-3)
    with pytest.raises(ValueError, match="whole objects"):
        model(io["x"][:6], io["timesteps"][:6], io["context"][:6], camera=io["camera"][:6], num_frames=4)


def test_unsupported_reference_settings_are_named(tiny):
    params, _, _ = tiny
    with pytest.raises(ValueError, match="use_linear_in_transformer"):
        unet_config({**params, "use_linear_in_transformer": False})
