//! `GET /docs`: an interactive page over `/openapi.json`, served by the coordinator itself (a
//! small script of our own, no CDN): every operation with its summary, path parameters, an
//! editable JSON body with an example, and a Send button that shows the status, headers and
//! body of the answer (images inline, event streams as they arrive).

use actix_web::{HttpResponse, get};

const PAGE: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Drover API</title>
<meta name="viewport" content="width=device-width"><style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
details{border:1px solid #ccc;margin:6px 0;padding:4px 8px}summary{cursor:pointer}
.m{display:inline-block;width:4.5em;font-weight:bold;text-transform:uppercase}
.get{color:#1a6}.post{color:#16a}.delete{color:#a22}
textarea{width:100%;font-family:monospace;height:9em}pre{background:#f5f5f5;padding:6px;white-space:pre-wrap;max-height:24em;overflow:auto}
input{font-family:monospace}label{margin-right:1em}
</style></head><body>
<h1>Drover REST API</h1>
<p>Operations of <a href="/openapi.json">/openapi.json</a>; calls go to this coordinator.
<label>API key or admin token <input id="token" type="password" size="28" autocomplete="off"></label>
<a href="/">dashboard</a></p>
<div id="ops">loading…</div>
<script>
(function () {
  var token = document.getElementById('token');
  token.value = localStorage.getItem('drover-token') || '';
  token.addEventListener('change', function () { localStorage.setItem('drover-token', token.value.trim()); });
  var examples = {
    'post /v1/generate': {prompt: 'a lighthouse at dusk', model: 'sd15', steps: 4, seed: 7},
    'post /v1/jobs': {prompt: 'a lighthouse at dusk', size: '512x512', steps: 4},
    'post /generate': {prompt: 'a lighthouse at dusk', size: '512x512', num_inference_steps: 4, guidance_scale: 8, seed: -1},
    'post /sdapi/v1/txt2img': {prompt: 'a lighthouse at dusk', steps: 4, cfg_scale: 8, width: 512, height: 512, seed: -1, batch_size: 1}
  };
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function send(method, path, params, body, out) {
    var url = path.replace(/\{(\w+)\}/g, function (_, name) { return encodeURIComponent(params[name].value.trim()); });
    var headers = {};
    var t = token.value.trim();
    if (t) { headers['Authorization'] = 'Bearer ' + t; }
    var init = { method: method.toUpperCase(), headers: headers };
    if (body) { headers['Content-Type'] = 'application/json'; init.body = body.value; }
    out.textContent = method.toUpperCase() + ' ' + url + ' …';
    var started = performance.now();
    fetch(url, init).then(function (r) {
      var head = r.status + ' ' + r.statusText + ' (' + Math.round(performance.now() - started) + ' ms)\n';
      r.headers.forEach(function (v, k) { head += k + ': ' + v + '\n'; });
      var type = r.headers.get('content-type') || '';
      if (type.indexOf('image/') === 0) {
        return r.blob().then(function (b) {
          out.textContent = head;
          out.appendChild(el('br'));
          out.appendChild(el('img', { src: URL.createObjectURL(b), alt: 'answer', style: 'max-width:512px' }));
        });
      }
      if (type.indexOf('text/event-stream') === 0 && r.body) {
        out.textContent = head + '\n';
        var reader = r.body.getReader(), dec = new TextDecoder();
        var pump = function () {
          return reader.read().then(function (c) {
            if (c.done) { return; }
            out.textContent += dec.decode(c.value);
            return pump();
          });
        };
        return pump();
      }
      return r.text().then(function (text) {
        try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { }
        out.textContent = head + '\n' + text;
      });
    }).catch(function (e) { out.textContent = 'request failed: ' + e; });
  }
  fetch('/openapi.json').then(function (r) { return r.json(); }).then(function (doc) {
    var ops = document.getElementById('ops');
    ops.textContent = '';
    ops.appendChild(el('p', {}, doc.info.title + ' ' + doc.info.version + ': ' + doc.info.description));
    Object.keys(doc.paths).forEach(function (path) {
      Object.keys(doc.paths[path]).forEach(function (method) {
        var op = doc.paths[path][method];
        var box = el('details', { 'data-op': method + ' ' + path });
        var sum = el('summary');
        sum.appendChild(el('span', { 'class': 'm ' + method }, method));
        sum.appendChild(el('code', {}, path));
        sum.appendChild(document.createTextNode(' — ' + op.summary));
        box.appendChild(sum);
        var params = {};
        (op.parameters || []).forEach(function (p) {
          var label = el('label', {}, p.name + ' ');
          var input = el('input', { size: 40, placeholder: p.schema.format || p.schema.type });
          label.appendChild(input);
          box.appendChild(label);
          params[p.name] = input;
        });
        var body = null;
        if (op.requestBody) {
          body = el('textarea');
          body.value = JSON.stringify(examples[method + ' ' + path] || {prompt: 'a lighthouse'}, null, 2);
          box.appendChild(body);
        }
        var codes = Object.keys(op.responses).join(', ');
        var admin = (op.security || []).some(function (s) { return 'adminToken' in s; });
        box.appendChild(el('div', {}, 'answers: ' + codes + (admin ? ' · needs the admin token' : '')));
        var button = el('button', {}, 'Send');
        var out = el('pre');
        button.addEventListener('click', function () { send(method, path, params, body, out); });
        box.appendChild(button);
        box.appendChild(out);
        ops.appendChild(box);
      });
    });
  });
})();
</script></body></html>"#;

/// Interactive API page (HTML)
///
/// Every operation of `/openapi.json` with a Send button.
#[utoipa::path(
    tag = "pages",
    responses(
        (status = 200, description = "The page", content_type = "text/html; charset=utf-8",
            body = String),
    )
)]
#[get("/docs")]
pub async fn api_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PAGE)
}
