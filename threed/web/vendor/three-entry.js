// The part of three.js the report viewer uses, bundled by update.sh into one classic (non-module) script:
// browsers refuse ES modules on pages opened from file://, a classic <script src> loads there.
import { Box3, Color, DirectionalLight, HemisphereLight, PerspectiveCamera, Scene, Sphere, Vector3, WebGLRenderer } from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

window.THREE = {
  Box3, Color, DirectionalLight, HemisphereLight, PerspectiveCamera, Scene, Sphere, Vector3, WebGLRenderer,
  GLTFLoader, OrbitControls,
};
