"""The settings of a mesh-shaped stage (threed/scenes/mesh.py, threed/stages.py): one `MeshConfig` section per
stage (`mesh:`, `geometry:`, `texture:`, `appearance:`), the geometry stage's start and warm-up
(`GeometryConfig`), and Fantasia3D's appearance stage's material and environment (`AppearanceConfig`).
Imported by threed/config.py, which holds the run's whole configuration; this module imports none of threed's
but the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _field
from typing import Literal

from threed.schedule import Schedule


@dataclass
class MeshLossConfig:
    """Weights (schedules over the mesh stage's steps) of the mesh stage's losses; zero throughout: not computed."""

    guidance: Schedule = Schedule.constant(1.0)
    # 1 - cos between the normals of the two faces at each edge (threed/mesh_losses.py). threestudio's 1e4
    # is for 1 - cos between *vertex* normals at an edge's ends, which is smaller on the same mesh.
    normal_consistency: Schedule = Schedule.constant(0.0)
    laplacian: Schedule = Schedule.constant(0.0)  # mean |mean(neighbours) - vertex|, scene units
    sign_flip: Schedule = Schedule.constant(0.0)  # DMTet's SDF regulariser on crossing edges (fields/dmtet.py)
    # Image-to-3D's texture stage (dreamgaussian-image, DreamGaussian's main2.py): the mean squared error between
    # the surface rendered from the reference camera and the input image over white, counted where the surface
    # is seen facing the camera (view cosine > 0.5); threed/scenes/reference.py, ReferenceViewTextureScene.
    reference: Schedule = Schedule.constant(0.0)


@dataclass
class MeshConfig:
    """A mesh stage (threed/scenes/mesh.py): a DMTet surface and a texture field, rasterized and optimised
    under the prior. Three sections have this shape, one per stage (threed/stages.py): `mesh`, Magic3D's fine
    stage (magic3d, magic3d-refine): the surface starts from the NeRF's density at its export level, the
    texture as a copy of the NeRF's albedo; `geometry` and `texture`, ProlificDreamer's stages 2 and 3: the
    geometry stage starts like `mesh` and shapes the surface from normal maps (`shading: normal`, SDS), the
    texture stage keeps that surface (its geometry learning rates 0) and trains the texture under VSD.
    Only methods with the stage read its section. Schedules here count the stage's own steps (from 0).
    Settings it does not name (ambient light, light distance, eval cameras, the optimiser:
    optim.optimizer, betas, eps, weight_decay) are the run's."""

    steps: int = 5000
    resolution: int = 128  # tetrahedral grid cells along the longest side of the coarse object's box
    # Largest vertex offset per axis, in cells (0: no deformation). threestudio bounds it by tanh to the grid's
    # extent / isosurface_resolution, one cell here (nvdiffrec alike); below 1/6 no tetrahedron can invert.
    deform_scale: float = 1.0
    # Gaussian blur of the start SDF, in cells (0: off): removes the facets that the NeRF density's jitter
    # from grid vertex to grid vertex gives marching tetrahedra (threed/fields/dmtet.py, sdf_from_values)
    start_smoothing: float = 1.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    # views per object in this stage's batch (camera.views): 1, or 4 where a multi-view prior scores them together
    # (dreamgaussian-mvdream's texture stage); batch_size a multiple of it
    views: int = 1
    rasterizer: Literal["auto", "torch", "nvdiffrast"] = "auto"
    # normal: normal maps over black (a geometry stage); pbr: split-sum image-based lighting of a physically
    # based material (Fantasia3D's appearance stage, `appearance:`)
    shading: Literal["random", "albedo", "lambertian", "textureless", "normal", "pbr"] = "random"
    albedo_only_steps: int = 0
    textureless_prob: float = 0.5
    albedo_prob: float = 0.0  # render.albedo_prob in this stage
    # Magic3D's soft shading (threestudio's soft_shading): each training render splits its light between
    # ambient and diffuse at random (ambient ~ U[0, 1)) instead of render.ambient's fixed split.
    soft_shading: bool = False
    distance: tuple[float, float] = (1.5, 2.0)  # camera ranges of this stage (azimuth: camera.azimuth)
    fovy: tuple[float, float] = (30.0, 45.0)
    elevation: tuple[float, float] = (-10.0, 45.0)
    t_min: Schedule = Schedule.constant(0.02)  # the prior's diffusion-time range in this stage
    t_max: Schedule = Schedule.constant(0.5)
    guidance_scale: float = -1.0  # classifier-free guidance of this stage's Stable Diffusion (< 0: the prior's)
    # the view-dependent prompts' front and back cones in this stage (degrees; < 0: camera.front_threshold and
    # camera.back_threshold)
    front_threshold: float = -1.0
    back_threshold: float = -1.0
    # Start this stage's texture field / background new (threestudio builds both anew at each stage start, as
    # it converts only the geometry) instead of as copies of the stage before's.
    fresh_texture: bool = False
    fresh_background: bool = False
    lr_sdf: Schedule = Schedule.constant(1e-4)  # scene units per step (a cell at resolution 128 is ~0.01)
    lr_deformation: Schedule = Schedule.constant(0.01)  # of the pre-tanh offset
    lr_texture: Schedule = Schedule.constant(0.01)  # the texture field's hash grid (and MLP, unless ...)
    lr_texture_mlp: Schedule = Schedule.constant(-1.0)  # ... its MLP's own rate; < 0: mesh.lr_texture
    # the background, copied from the coarse stage (0: frozen; threestudio trains it: 0.01 in Magic3D's refine
    # stage, 0.001 in ProlificDreamer's texture stage)
    lr_background: Schedule = Schedule.constant(0.0)
    random_aug: float = 0.0  # render.random_aug in this stage (threestudio's ProlificDreamer texture stage: off)
    # this stage's background kind (render.background's choices); empty: the run's (DreamGaussian's texture
    # stage renders over white, its Gaussian stage over white or black)
    background: Literal["", "mlp", "solid", "random", "white_or_black"] = ""
    # Render the surface without its connected parts under this fraction of the largest part's faces (0: all
    # of it; threestudio's isosurface_remove_outliers, which ProlificDreamer's texture stage turns on at 0.01).
    keep_components: float = 0.0
    loss: MeshLossConfig = _field(default_factory=MeshLossConfig)


@dataclass
class SDFInitConfig:
    """The start of a geometry stage that does not follow a NeRF (Fantasia3D; threed/fields/sdf_init.py): a
    sphere, or a guide mesh (`mesh`, threed run --init-mesh) centred, turned so its `mesh_up` and `mesh_front`
    axes become the scene's +y and +z, and scaled to `mesh_scale` of the scene's box."""

    radius: float = 0.5  # the sphere's radius, scene units
    mesh: str = ""  # a guide mesh (OBJ/PLY/GLB/STL); empty: the sphere
    mesh_scale: float = 0.9  # the guide mesh's largest |coordinate| after centring, a fraction of render.bound
    mesh_up: Literal["+x", "+y", "+z", "-x", "-y", "-z"] = "+y"  # the guide mesh's up axis
    mesh_front: Literal["+x", "+y", "+z", "-x", "-y", "-z"] = "+z"  # ... and the axis its front faces


@dataclass
class GeometryConfig(MeshConfig):
    """A geometry stage (`geometry:`): ProlificDreamer's, started from the NeRF, or Fantasia3D's, started from
    `init` (a sphere or a guide mesh). `latent_steps`: Fantasia3D's warm-up, the first steps scoring the
    normal map and mask downsampled to the latent's size as the latent itself (no encoder)."""

    latent_steps: int = 0
    init: SDFInitConfig = _field(default_factory=SDFInitConfig)
    # Fantasia3D's (threestudio's implicit-sdf): the SDF and offsets are a hash grid's and two MLPs' outputs (the
    # `field:` section's size) at the grid vertices, the start a fixed term (threed/fields/neural_sdf.py);
    # false: one free value per vertex, as a geometry stage refining a NeRF keeps them
    sdf_network: bool = False
    # with sdf_network, training steps between two evaluations at every grid vertex; the steps between
    # re-evaluate the band around the surface only (threed/fields/neural_sdf.py; 1: exact, every step)
    sdf_network_refresh: int = 1


@dataclass
class AppearanceConfig(MeshConfig):
    """Fantasia3D's appearance stage (`appearance:`): the geometry stage's surface kept, a material field (albedo,
    roughness, metallic; threed/fields/material.py) shaded by split-sum image-based lighting
    (threed/render/ibl.py) under an environment map."""

    shading: Literal["random", "albedo", "lambertian", "textureless", "normal", "pbr"] = "pbr"
    env_map: str = ""  # a Radiance .hdr (equirectangular), threed run --env-map; empty: the sky made in code
    env_scale: float = 2.0  # the environment's radiance is multiplied by this
    roughness: tuple[float, float] = (0.08, 0.9)  # the material field's roughness range
    metallic: tuple[float, float] = (0.0, 0.9)  # ... and its metallic range
    weighting: Literal["", "sds", "uniform", "fantasia3d"] = ""  # this stage's SDS w(t); empty: guidance.weighting
