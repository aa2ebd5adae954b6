"""Physically based export (threed/texture.py with a material, exporters/textured_glb.py, textured_obj.py): the
albedo and metallic-roughness textures baked through the UV path, read back through trimesh, pygltflib, the
Khronos validator and, where it is installed, Blender."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import torch
import trimesh

from helpers_gltf import validate_gltf
from test_texture import bumpy_sphere, position_colour, sample_bilinear
from threed.texture import export_textured


def material(points: torch.Tensor) -> torch.Tensor:
    """A smooth material over the bumpy sphere: albedo by position, roughness in [0.08, 0.9] rising with x,
    metallic in [0, 0.9] rising with y."""
    roughness = 0.08 + 0.82 * (points[:, :1] / 1.4 + 0.5).clamp(0, 1)
    metallic = 0.9 * (points[:, 1:2] / 1.4 + 0.5).clamp(0, 1)
    return torch.cat([position_colour(points), roughness, metallic], dim=-1)


@pytest.fixture(scope="module")
def pbr_files(tmp_path_factory):
    v, f = bumpy_sphere(3)
    out = tmp_path_factory.mktemp("pbr")
    paths = export_textured(v, f, position_colour, out, texture_size=256, max_faces=2000, progress=False,
                            material_fn=material)
    return {p.name: p for p in paths}


def test_pbr_files_written(pbr_files):
    assert sorted(pbr_files) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.png", "mesh_metallic.png",
                                 "mesh_roughness.png"]


TOL = 1.0 / 255 + 1e-3


def _check_maps(vertices, faces, uv, base, mr) -> None:
    """Albedo, roughness (G) and metallic (B) read at face centroids through the file's own UVs match the
    material there (the loaded, decimated surface's centroids): measured max 0.0019 in each map (8-bit
    rounding; 256² texture, 2000 faces), allowed one 8-bit step + 0.001."""
    centroids = torch.from_numpy(vertices[faces].mean(1))
    truth = material(centroids).numpy()
    at = uv[faces].mean(1)
    assert np.abs(sample_bilinear(base, at) - truth[:, :3]).max() < TOL
    got = sample_bilinear(mr, at)
    assert np.abs(got[:, 1] - truth[:, 3]).max() < TOL
    assert np.abs(got[:, 2] - truth[:, 4]).max() < TOL


def test_pbr_glb_round_trip_in_trimesh_and_pygltflib(pbr_files):
    path = pbr_files["mesh.glb"]
    scene = trimesh.load(path, process=False)
    (loaded,) = scene.geometry.values()
    mat = loaded.visual.material
    assert isinstance(mat, trimesh.visual.material.PBRMaterial)
    base = np.asarray(mat.baseColorTexture.convert("RGB"))
    mr = np.asarray(mat.metallicRoughnessTexture.convert("RGB"))
    _check_maps(loaded.vertices, loaded.faces, loaded.visual.uv, base, mr)

    gltf = pygltflib.GLTF2().load(str(path))
    pbr = gltf.materials[0].pbrMetallicRoughness
    assert (pbr.metallicFactor, pbr.roughnessFactor) == (1.0, 1.0)
    names = [gltf.images[gltf.textures[t.index].source].name
             for t in (pbr.baseColorTexture, pbr.metallicRoughnessTexture)]
    assert names == ["albedo", "metallicRoughness"]


def test_pbr_glb_passes_the_validator(pbr_files):
    report = validate_gltf(pbr_files["mesh.glb"])
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]


def test_pbr_obj_names_its_maps(pbr_files):
    """The MTL names the albedo (map_Kd) and the PBR extension's roughness and metallic maps (map_Pr,
    map_Pm); trimesh loads the albedo and keeps the other keys; the grey maps hold the GLB's G and B."""
    mtl = pbr_files["mesh.mtl"].read_text()
    for line in ("map_Kd mesh.png", "map_Pr mesh_roughness.png", "map_Pm mesh_metallic.png", "Pr 1", "Pm 1"):
        assert line in mtl.splitlines()
    loaded = trimesh.load(pbr_files["mesh.obj"], process=False)
    kwargs = loaded.visual.material.kwargs
    assert kwargs["map_pr"] == ["mesh_roughness.png"] and kwargs["map_pm"] == ["mesh_metallic.png"]
    base = np.asarray(loaded.visual.material.image.convert("RGB"))
    from PIL import Image

    rough = np.asarray(Image.open(pbr_files["mesh_roughness.png"]).convert("L"))
    metal = np.asarray(Image.open(pbr_files["mesh_metallic.png"]).convert("L"))
    mr = np.stack([np.full_like(rough, 255), rough, metal], axis=-1)
    _check_maps(loaded.vertices, loaded.faces, loaded.visual.uv, base, mr)


# Debian's Blender 3.4 glTF add-on still uses numpy's `np.bool`, which NumPy 1.24 (Debian's) removed: the
# script restores that alias before importing, changing nothing else.
BLENDER_SCRIPT = r"""
import bpy, json, sys
import numpy
if not hasattr(numpy, "bool"):
    numpy.bool = bool
path, out = sys.argv[sys.argv.index("--") + 1:]
bpy.ops.wm.read_factory_settings(use_empty=True)
if path.endswith(".glb"):
    bpy.ops.import_scene.gltf(filepath=path)
else:
    bpy.ops.wm.obj_import(filepath=path)
found = {}
for mat in bpy.data.materials:
    if not mat.use_nodes:
        continue
    for node in mat.node_tree.nodes:
        if node.type != "BSDF_PRINCIPLED":
            continue
        for name in ("Base Color", "Roughness", "Metallic"):
            def source(socket, depth=0):
                if not socket.is_linked or depth > 4:
                    return None
                node = socket.links[0].from_node
                if node.type == "TEX_IMAGE":
                    return node.image.name if node.image else "?"
                for inp in node.inputs:
                    s = source(inp, depth + 1)
                    if s:
                        return s
                return None
            found[name] = source(node.inputs[name])
json.dump(found, open(out, "w"))
"""


@pytest.mark.parametrize("name", ["mesh.glb", "mesh.obj"])
def test_blender_connects_the_textures_to_its_principled_bsdf(pbr_files, name, tmp_path):
    """Blender's glTF and OBJ importers wire the albedo to Base Color and the roughness and metallic maps to
    their sockets (skipped where no `blender` is on the PATH: it is not a dependency of threed). Checked with
    Debian's Blender 3.4.1 (apt install blender python3-numpy)."""
    blender = shutil.which("blender")
    if blender is None:
        pytest.skip("blender is not installed")
    script, out = tmp_path / "check.py", tmp_path / "found.json"
    script.write_text(BLENDER_SCRIPT)
    result = subprocess.run([blender, "-b", "--factory-startup", "--python", str(script), "--",
                             str(pbr_files[name]), str(out)], capture_output=True, text=True, timeout=300)
    assert out.exists(), result.stdout[-2000:] + result.stderr[-2000:]
    found = json.loads(out.read_text())
    expected = ({"Base Color": "albedo", "Roughness": "metallicRoughness", "Metallic": "metallicRoughness"}
                if name.endswith(".glb") else
                {"Base Color": "mesh.png", "Roughness": "mesh_roughness.png", "Metallic": "mesh_metallic.png"})
    assert found == expected
