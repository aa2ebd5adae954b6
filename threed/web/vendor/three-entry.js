// The part of three.js the report viewer uses, bundled by update.sh into one classic (non-module) script:
// browsers refuse ES modules on pages opened from file://, a classic <script src> loads there.
// DataTexture .. PMREMGenerator: a run's environment map (half-float equirect data in the page) as the scene's
// image-based light, so a PBR material is seen under the light it was made for.
import {
  Box3, Color, DataTexture, DirectionalLight, EquirectangularReflectionMapping, HalfFloatType, HemisphereLight,
  LinearFilter, LinearSRGBColorSpace, PMREMGenerator, PerspectiveCamera, RGBAFormat, Scene, Sphere, Vector3,
  WebGLRenderer,
} from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

window.THREE = {
  Box3, Color, DataTexture, DirectionalLight, EquirectangularReflectionMapping, HalfFloatType, HemisphereLight,
  LinearFilter, LinearSRGBColorSpace, PMREMGenerator, PerspectiveCamera, RGBAFormat, Scene, Sphere, Vector3,
  WebGLRenderer, GLTFLoader, OrbitControls,
};
