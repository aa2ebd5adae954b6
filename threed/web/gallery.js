// threed report pages: sortable tables, media that fails shows a placeholder, and 3D viewers of mesh.glb.
// A classic script (no ES modules) so the page also works when opened from file://.
(function () {
  "use strict";

  // -- tables: click a header to sort; numbers sort as numbers, missing values always last ---------------

  function sortKey(cell) {
    if (!cell || cell.classList.contains("na")) return null;
    var raw = cell.getAttribute("data-sort");
    if (raw !== null) {
      var num = Number(raw);
      return raw !== "" && isFinite(num) ? num : raw;
    }
    return cell.textContent.trim();
  }

  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = th.getAttribute("aria-sort") === "ascending";
    var keys = rows.map(function (r) { return sortKey(r.cells[col]); });
    var numeric = keys.every(function (k) { return k === null || typeof k === "number"; });
    var order = rows.map(function (r, i) { return i; });
    order.sort(function (a, b) {
      var ka = keys[a], kb = keys[b];
      if (ka === null || kb === null) return ka === kb ? a - b : (ka === null ? 1 : -1);
      var c = numeric ? ka - kb : String(ka).localeCompare(String(kb), undefined, { numeric: true });
      return (descending ? -c : c) || a - b;
    });
    order.forEach(function (i) { body.appendChild(rows[i]); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  function initTables() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      if (!table.tHead || !table.tBodies.length) return;
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        var button = document.createElement("button");
        button.type = "button";
        button.title = "sort by " + th.textContent.trim();
        while (th.firstChild) button.appendChild(th.firstChild);
        th.appendChild(button);
        button.addEventListener("click", function () { sortTable(table, col, th); });
      });
    });
  }

  // -- media: a file that cannot be loaded becomes a placeholder, never a broken element --------------

  function placeholder(el, text) {
    var p = document.createElement("div");
    p.className = "missing";
    p.textContent = text;
    el.replaceWith(p);
  }

  function initMedia() {
    document.querySelectorAll("img[data-what]").forEach(function (img) {
      var fail = function () { placeholder(img, "Cannot load " + img.getAttribute("data-what") + "."); };
      if (img.complete && img.naturalWidth === 0) fail();
      else img.addEventListener("error", fail);
    });
    var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {  // turntables play while on screen
        if (e.isIntersecting) e.target.play().catch(function () {});
        else e.target.pause();
      });
    }) : null;
    document.querySelectorAll("video[data-what]").forEach(function (video) {
      var fail = function () {
        placeholder(video, "Cannot play " + video.getAttribute("data-what") + " in this browser.");
      };
      if (video.error || video.networkState === 3) fail();  // 3: NETWORK_NO_SOURCE
      else video.addEventListener("error", fail);
      if (observer && video.hasAttribute("data-autoplay")) observer.observe(video);
    });
  }

  // -- 3D viewers: three.js, one WebGL context per viewer on screen ------------------------------------

  function glbBytes(el) {
    var inline = el.getAttribute("data-glb-inline");
    var node = inline && document.getElementById(inline);
    if (node) {
      return new Promise(function (resolve) { resolve(base64Bytes(node.textContent).buffer); });
    }
    var url = el.getAttribute("data-glb");
    if (!/^https?:$/.test(location.protocol)) {
      return Promise.reject(new Error("This mesh is too large to embed, and browsers do not let a page opened " +
        "from a file read " + url + ": serve the folder with `threed view DIR`."));
    }
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error("Cannot load " + url + " (HTTP " + r.status + ").");
      return r.arrayBuffer();
    });
  }

  function base64Bytes(text) {
    var raw = atob(text.trim());
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  // The run's environment map (report.py's environment_texture: half-float RGBA, equirectangular), prefiltered
  // by three.js into the scene's image-based light; null when the page holds none.
  function environmentLight(el, renderer) {
    var T = window.THREE;
    var node = document.getElementById(el.getAttribute("data-env") || "");
    var size = (el.getAttribute("data-env-size") || "").split(" ").map(Number);
    if (!node || size.length !== 2) return null;
    var texels = new Uint16Array(base64Bytes(node.textContent).buffer);
    if (texels.length !== size[0] * size[1] * 4) return null;
    var texture = new T.DataTexture(texels, size[0], size[1], T.RGBAFormat, T.HalfFloatType);
    texture.mapping = T.EquirectangularReflectionMapping;
    texture.colorSpace = T.LinearSRGBColorSpace;
    texture.magFilter = texture.minFilter = T.LinearFilter;
    texture.needsUpdate = true;
    var pmrem = new T.PMREMGenerator(renderer);
    var light = pmrem.fromEquirectangular(texture).texture;
    pmrem.dispose();
    texture.dispose();
    return light;
  }

  function showError(el, message) {
    el.setAttribute("data-state", "error");
    el.textContent = "";
    var p = document.createElement("div");
    p.className = "missing";
    p.textContent = message;
    el.appendChild(p);
  }

  function Viewer(el, scene) {
    var T = window.THREE;
    this.el = el;
    this.renderer = new T.WebGLRenderer({ antialias: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.scene = new T.Scene();
    this.scene.background = new T.Color(el.getAttribute("data-background") || "#e9ecef");
    this.camera = new T.PerspectiveCamera(35, 1, 0.01, 100);
    this.environment = environmentLight(el, this.renderer);
    if (this.environment) {  // a PBR material, under the light it was made for
      this.scene.environment = this.environment;
    } else {
      this.scene.add(new T.HemisphereLight(0xffffff, 0x8d8d8d, 2.0));
      var headlight = new T.DirectionalLight(0xffffff, 1.2);  // lights the side the viewer looks at
      headlight.position.set(0.5, 1, 1);
      this.camera.add(headlight);
    }
    this.scene.add(this.camera);
    this.model = scene;
    this.scene.add(scene);

    var sphere = new T.Box3().setFromObject(scene).getBoundingSphere(new T.Sphere());
    var radius = Math.max(sphere.radius, 1e-3);
    var distance = radius / Math.sin((this.camera.fov / 2) * Math.PI / 180) * 1.1;
    var direction = new T.Vector3(0, 0.35, 1).normalize();  // front (+z), a little above, as the turntable
    this.camera.position.copy(sphere.center).addScaledVector(direction, distance);
    this.camera.near = distance / 100;
    this.camera.far = distance * 10;
    this.controls = new T.OrbitControls(this.camera, this.renderer.domElement);
    this.controls.target.copy(sphere.center);
    this.controls.update();

    var self = this, pending = false;
    this.render = function () {
      if (pending || !self.renderer) return;
      pending = true;
      requestAnimationFrame(function () {
        pending = false;
        if (!self.renderer) return;
        self.renderer.render(self.scene, self.camera);
        el.setAttribute("data-state", "ready");
      });
    };
    this.controls.addEventListener("change", this.render);
    this.resize = function () {
      var w = el.clientWidth || 256, h = el.clientHeight || 256;
      self.renderer.setSize(w, h, false);
      self.camera.aspect = w / h;
      self.camera.updateProjectionMatrix();
      self.render();
    };
    el.textContent = "";
    el.appendChild(this.renderer.domElement);
    if ("ResizeObserver" in window) {
      this.resizer = new ResizeObserver(this.resize);
      this.resizer.observe(el);
    }
    this.resize();
  }

  Viewer.prototype.dispose = function () {  // frees the WebGL context: browsers allow only a few at once
    if (this.resizer) this.resizer.disconnect();
    this.controls.dispose();
    this.scene.remove(this.model);
    if (this.environment) this.environment.dispose();
    this.renderer.dispose();
    this.renderer.forceContextLoss();
    this.renderer.domElement.remove();
    this.renderer = null;
    this.el.setAttribute("data-state", "idle");
  };

  function startViewer(el) {
    if (el._viewer || el._loading) return;
    if (!window.THREE) {
      showError(el, "The 3D viewer script (report_files/three.min.js) is missing beside this page.");
      return;
    }
    el.setAttribute("data-state", "loading");
    el._loading = (el._scene ? Promise.resolve(el._scene) : glbBytes(el).then(function (buffer) {
      return new Promise(function (resolve, reject) {
        new window.THREE.GLTFLoader().parse(buffer, "", function (gltf) { resolve(gltf.scene); }, function (e) {
          reject(new Error("Cannot read the mesh: " + (e && e.message ? e.message : e)));
        });
      });
    })).then(function (scene) {
      el._loading = null;
      var vertices = 0;
      scene.traverse(function (o) {
        if (o.geometry && o.geometry.attributes.position) vertices += o.geometry.attributes.position.count;
      });
      if (!vertices) throw new Error("The mesh is empty (no vertices): the run may need more steps.");
      el._scene = scene;
      if (el._visible) el._viewer = new Viewer(el, scene);
      else el.setAttribute("data-state", "idle");
    }).catch(function (e) {
      el._loading = null;
      showError(el, e.message || String(e));
    });
  }

  function initViewers() {
    var viewers = document.querySelectorAll(".viewer[data-glb]");
    if (!viewers.length) return;
    if (!("IntersectionObserver" in window)) {
      viewers.forEach(function (el) { el._visible = true; startViewer(el); });
      return;
    }
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        var el = e.target;
        el._visible = e.isIntersecting;
        if (e.isIntersecting) startViewer(el);
        else if (el._viewer) { el._viewer.dispose(); el._viewer = null; }
      });
    }, { rootMargin: "200px" });
    viewers.forEach(function (el) { observer.observe(el); });
  }

  function init() {
    initTables();
    initMedia();
    initViewers();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
