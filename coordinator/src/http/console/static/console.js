// Lull's console: the one script the pages load. It attaches the API key to every request
// (signing it for a signed key), swaps server-rendered parts in, follows the live feed
// (WS /ws/updates) to fetch a part again when something it shows changed, and sends the
// forms and buttons to the JSON API. No framework, no build step.
'use strict';
(() => {
  const KEY = 'lull.key';
  const authOn = document.body.dataset.auth === 'on';
  const MAY = { task: ['admin', 'submitter'], admin: ['admin'] };
  const POLL_MS = 5000;
  const MIN_GAP_MS = 400;
  const encoder = new TextEncoder();
  let role = null;
  let lastSeq = 0;
  let feedLive = false;
  let lastTimestamp = 0;

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

  // ---------------------------------------------------------------------------------------
  // The key: sessionStorage only (gone when the tab closes)
  // ---------------------------------------------------------------------------------------
  const loadKey = () => { try { return JSON.parse(sessionStorage.getItem(KEY)); } catch { return null; } };
  const saveKey = (k) => sessionStorage.setItem(KEY, JSON.stringify(k));
  const forgetKey = () => sessionStorage.removeItem(KEY);

  async function hmacHex(secret, text) {
    if (!window.crypto || !crypto.subtle) {
      throw new Error('signing needs WebCrypto, which browsers offer only on https, localhost or 127.0.0.1');
    }
    const key = await crypto.subtle.importKey('raw', encoder.encode(secret), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
    const mac = new Uint8Array(await crypto.subtle.sign('HMAC', key, encoder.encode(text)));
    return Array.from(mac, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // Strictly increasing, so two identical requests never carry the same signature.
  function timestamp() {
    lastTimestamp = Math.max(Date.now(), lastTimestamp + 1);
    return String(lastTimestamp);
  }

  // README "Security": sign_str = hex HMAC-SHA256(secret, timestamp\nMETHOD\npath?query\nbody).
  async function keyHeaders(method, path, body) {
    const key = authOn ? loadKey() : null;
    if (!key) return {};
    const headers = { token: key.token };
    if (key.secret) {
      headers.timestamp = timestamp();
      headers.sign_str = await hmacHex(key.secret, `${headers.timestamp}\n${method.toUpperCase()}\n${path}\n${body}`);
    }
    return headers;
  }

  class HttpError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  // One request to the coordinator; JSON answers parsed, errors thrown with their detail.
  async function call(method, path, payload) {
    const body = payload === undefined ? '' : JSON.stringify(payload);
    const headers = await keyHeaders(method, path, body);
    if (payload !== undefined) headers['content-type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: payload === undefined ? undefined : body, cache: 'no-store' });
    } catch (e) {
      throw new HttpError(0, `the coordinator did not answer (${e.message})`);
    }
    const text = await resp.text();
    let data = text;
    if ((resp.headers.get('content-type') || '').includes('json')) {
      try { data = JSON.parse(text); } catch { /* shown as text */ }
    }
    if (!resp.ok || (data && data.successful === false)) {
      const detail = (data && (data.detail || (data.error && data.error.message))) || `${resp.status} ${resp.statusText}`;
      if (resp.status === 401 && authOn) askForKey(detail);
      throw new HttpError(resp.status, detail);
    }
    return data;
  }

  function askForKey(detail) {
    const dialog = $('#key-dialog');
    $('#key-error').textContent = detail || '';
    if (!dialog.open) dialog.showModal();
  }

  // ---------------------------------------------------------------------------------------
  // Roles: what the key may not do is disabled, not hidden
  // ---------------------------------------------------------------------------------------
  function gate(root) {
    for (const el of $$('[data-role]', root)) {
      const allowed = role !== null && (MAY[el.dataset.role] || []).includes(role);
      const controls = el.matches('form') ? $$('button, input, select, textarea', el) : [el];
      for (const c of controls) {
        if (allowed) continue;
        c.disabled = true;
        c.title = `your key's role (${role || 'unknown'}) may not do this`;
      }
      el.classList.toggle('denied', !allowed);
    }
  }

  // Today's times as a time of day; older ones with their date.
  function localTime(ms) {
    const d = new Date(ms);
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // Local time for every <time data-ts>, roles for every control.
  function decorate(root) {
    for (const t of $$('time[data-ts]', root)) {
      if (!t.title) t.title = `${t.textContent} UTC`;
      t.textContent = localTime(Number(t.dataset.ts) * 1000);
    }
    gate(root);
  }

  // ---------------------------------------------------------------------------------------
  // Parts: server-rendered fragments, fetched again when the feed says they changed
  // ---------------------------------------------------------------------------------------
  function busyEditing(el) {
    const a = document.activeElement;
    return a && el.contains(a) && a.matches('input, textarea, select');
  }

  async function loadPart(el) {
    const url = el.dataset.part;
    if (!url) return;
    if (busyEditing(el)) { el.dataset.stale = '1'; return; }
    const generation = (el._generation || 0) + 1;
    el._generation = generation;
    const open = $$('details[open][id]', el).map((d) => d.id);
    try {
      const html = await call('GET', url);
      if (el._generation !== generation) return; // a newer load won
      if (busyEditing(el)) { el.dataset.stale = '1'; return; }
      el.innerHTML = html;
      for (const id of open) { const d = document.getElementById(id); if (d) d.open = true; }
      delete el.dataset.stale;
      decorate(el);
      el.dispatchEvent(new CustomEvent('part-loaded', { bubbles: true }));
    } catch (e) {
      if (el._generation !== generation) return;
      // Over the key's rate limit: keep what is shown and try again shortly.
      if (e.status === 429) { setTimeout(() => schedule(el), 2000); return; }
      el.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    }
  }

  // At most one load per part every MIN_GAP_MS, the last change always shown.
  function schedule(el) {
    if (el._timer) return;
    const wait = Math.max(0, MIN_GAP_MS - (Date.now() - (el._last || 0)));
    el._timer = setTimeout(() => { el._timer = null; el._last = Date.now(); loadPart(el); }, wait);
  }

  function refreshAll() {
    for (const el of $$('[data-part]')) schedule(el);
    loadOperations();
  }

  function wants(el, event) {
    const kind = event.event;
    const taskId = event.data && event.data.task_id;
    return (el.dataset.live || '').split(' ').some((w) => {
      if (!w) return false;
      if (w.startsWith('task:')) return kind.startsWith('task_') && String(taskId) === w.slice(5);
      return kind.startsWith(`${w}_`);
    });
  }

  function onEvent(event) {
    if (typeof event.seq === 'number') lastSeq = Math.max(lastSeq, event.seq);
    if (event.event === 'lagged') { refreshAll(); return; }
    for (const el of $$('[data-live]')) if (wants(el, event)) schedule(el);
    if (event.event === 'operation_updated') loadOperations();
  }

  // ---------------------------------------------------------------------------------------
  // The live feed, with polling while it is down
  // ---------------------------------------------------------------------------------------
  function feedState(live, text) {
    feedLive = live;
    const el = $('#feed');
    el.textContent = text;
    el.className = `feed ${live ? 'live' : 'down'}`;
  }

  const FEED_EVENTS = {
    task: ['task_created', 'task_started', 'task_completed', 'task_failed', 'task_cancelled', 'task_requeued'],
    node: ['node_updated', 'node_joined', 'node_left'],
  };

  // Only the kinds this page shows (every page may come to follow a task).
  function feedEvents() {
    const kinds = new Set(['task']);
    for (const el of $$('[data-live]')) {
      for (const w of el.dataset.live.split(' ')) if (w) kinds.add(w.split(':')[0]);
    }
    const events = [...kinds].flatMap((k) => FEED_EVENTS[k] || []);
    if ($('[data-operations]')) events.push('operation_updated');
    return events.join(',');
  }

  async function feedUrl() {
    // Arrays of events, one message per wake-up of the coordinator's connection: a busy pool
    // costs the page one message per batch, not one per event.
    const params = [`events=${feedEvents()}`, 'batch=true'];
    if (lastSeq) params.push(`since=${lastSeq}`);
    const key = authOn ? loadKey() : null;
    if (key) {
      // Browsers cannot set headers on a WebSocket: the key goes in the query string, and a
      // signature covers the path-with-query without its sign_str.
      params.push(`token=${encodeURIComponent(key.token)}`);
      if (key.secret) {
        const ts = timestamp();
        params.push(`timestamp=${ts}`);
        const signed = `/ws/updates?${params.join('&')}`;
        params.push(`sign_str=${await hmacHex(key.secret, `${ts}\nGET\n${signed}\n`)}`);
      }
    }
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    return `${scheme}://${location.host}/ws/updates${params.length ? `?${params.join('&')}` : ''}`;
  }

  let backoff = 1000;
  async function connectFeed() {
    let ws;
    try {
      ws = new WebSocket(await feedUrl());
    } catch (e) {
      feedState(false, 'polling');
      setTimeout(connectFeed, backoff);
      return;
    }
    ws.onopen = () => { backoff = 1000; feedState(true, 'live'); refreshAll(); };
    ws.onmessage = (m) => {
      let parsed;
      try { parsed = JSON.parse(m.data); } catch { return; /* not ours */ }
      for (const event of Array.isArray(parsed) ? parsed : [parsed]) {
        try { onEvent(event); } catch { /* not ours */ }
      }
    };
    ws.onclose = () => {
      feedState(false, 'polling');
      backoff = Math.min(backoff * 2, 30000);
      setTimeout(connectFeed, backoff);
    };
  }

  // ---------------------------------------------------------------------------------------
  // Operations (scale-out, shrink): drawn here from GET /api/v1/operations
  // ---------------------------------------------------------------------------------------
  function when(v) {
    if (v === null || v === undefined || v === '') return '';
    if (typeof v === 'number') return localTime(v * 1000);
    if (String(v).startsWith('0001-')) return '';
    const d = new Date(v);
    return Number.isNaN(d.getTime()) ? String(v) : localTime(d.getTime());
  }

  function opCard(op, open) {
    const stages = Array.isArray(op.nodes) ? op.nodes : [];
    const max = Number(op.max_stage) || stages.length || 0;
    const stage = Number(op.stage) || 0;
    const done = op.state === 'SUCCEEDED' ? max : Math.max(0, stage - 1);
    const pct = max ? Math.round((done / max) * 100) : 0;
    const rows = stages.map((s, i) => `<tr data-stage="${i + 1}">
        <td class="num">${i + 1}</td><td>${esc(s.name)}</td>
        <td><span class="badge state-${esc(s.state)}">${esc(s.state)}</span></td>
        <td>${esc(when(s.start_time))}</td><td>${esc(when(s.end_time))}</td>
        <td class="grow ${s.state === 'FAILED' ? 'error' : ''}">${esc(s.message ?? '')}</td></tr>`).join('');
    const extra = op.additional_data && Object.keys(op.additional_data).length
      ? `<p class="mono muted">${esc(JSON.stringify(op.additional_data))}</p>` : '';
    return `<article class="op card" data-op="${esc(op.id)}" data-state="${esc(op.state)}">
      <header>
        <h3>${esc(op.name)} <span class="muted">#${esc(op.id)}</span></h3>
        <span class="badge state-${esc(op.state)} op-state">${esc(op.state)}</span>
        <div class="progress" title="stage ${stage} of ${max}"><i style="width:${pct}%"></i><span>stage ${stage} / ${max}</span></div>
        <span class="muted">${esc(op.operator)} · ${esc(when(op.start_time))}${when(op.end_time) ? ` → ${esc(when(op.end_time))}` : ''}</span>
      </header>
      <details id="op-${esc(op.id)}"${open ? ' open' : ''}><summary>Stages</summary>
        ${rows ? `<div class="scroll"><table class="dense"><thead><tr><th class="num">#</th><th>Stage</th><th>State</th><th>Started</th><th>Ended</th><th class="grow">Message</th></tr></thead><tbody>${rows}</tbody></table></div>` : '<p class="muted">No stage has started.</p>'}
        ${extra}
      </details>
    </article>`;
  }

  let opsGeneration = 0;
  async function loadOperations() {
    const el = $('[data-operations]');
    if (!el) return;
    const generation = ++opsGeneration;
    const open = new Set($$('details[id]', el).filter((d) => d.open).map((d) => d.id));
    const seen = new Set($$('details[id]', el).map((d) => d.id));
    try {
      const data = await call('GET', '/api/v1/operations?limit=50');
      if (generation !== opsGeneration) return;
      const items = data.items || [];
      el.innerHTML = items.length
        ? items.map((op, i) => {
          const id = `op-${op.id}`;
          return opCard(op, seen.has(id) ? open.has(id) : i < 3 || op.state === 'RUNNING');
        }).join('')
        : '<p class="muted">No operation yet.</p>';
      decorate(el);
    } catch (e) {
      if (generation !== opsGeneration) return;
      if (e.status === 404) {
        el.innerHTML = '<p class="notice" id="ops-unavailable">Operations are not available on this coordinator: <code>GET /api/v1/operations</code> answered 404 Not Found. Scale-out and shrink need a coordinator that has them.</p>';
        for (const b of $$('#scale-out-form button, #shrink-form button')) {
          b.disabled = true;
          b.title = 'operations are not available on this coordinator';
        }
      } else {
        el.innerHTML = `<p class="error">${esc(e.message)}</p>`;
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Forms and buttons → the JSON API
  // ---------------------------------------------------------------------------------------
  function labelOf(el) {
    const l = el.closest('label');
    return l ? l.firstChild.textContent.trim() : el.name;
  }

  // Inputs named `a.b` build `{"a": {"b": ...}}`; empty ones are left out.
  function formBody(form) {
    const out = {};
    for (const el of form.elements) {
      if (!el.name) continue;
      const type = el.dataset.type;
      let value;
      if (type === 'bool') {
        value = el.checked;
      } else {
        const raw = el.value.trim();
        if (raw === '') continue;
        if (type === 'number') {
          value = Number(raw);
          if (!Number.isFinite(value)) throw new Error(`${labelOf(el)} must be a number`);
        } else if (type === 'json') {
          try { value = JSON.parse(raw); } catch (e) { throw new Error(`${labelOf(el)} is not valid JSON: ${e.message}`); }
        } else {
          value = el.tagName === 'TEXTAREA' ? el.value : raw;
        }
      }
      const path = el.name.split('.');
      let at = out;
      for (const p of path.slice(0, -1)) at = at[p] = at[p] || {};
      at[path[path.length - 1]] = value;
    }
    return out;
  }

  function said(answer) {
    if (!answer || typeof answer !== 'object') return 'done';
    if (answer.command) return `${answer.command.command} sent (command ${answer.command.id}, ${answer.command.status})`;
    if (answer.job_id !== undefined) return `shrink started: operation ${answer.job_id}`;
    if (answer.data && answer.data.id !== undefined) return `scale-out started: operation ${answer.data.id}`;
    if (answer.meta) return 'meta saved';
    if (answer.task_id !== undefined) return `task ${answer.task_id}: ${answer.status}`;
    return 'done';
  }

  function follow(taskId) {
    const section = $('#follow');
    const part = $('#follow-part');
    part.dataset.part = `/ui/part/task/${taskId}`;
    part.dataset.live = `task:${taskId}`;
    section.hidden = false;
    loadPart(part);
  }

  // The outcome of an action also shows in a corner: a part refreshed after the action may
  // replace the control (and its own output) that started it.
  let flashTimer = null;
  function flash(text, ok) {
    const el = $('#flash');
    el.textContent = text;
    el.className = `flash ${ok ? 'ok' : 'error'}`;
    el.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { el.hidden = true; }, 8000);
  }

  async function act(el, spec, body) {
    const [method, path] = spec.split(' ');
    const out = el.matches('form') ? $('output.result', el) : $('output.result', el.closest('td, .task-head, .card') || document.body);
    const buttons = el.matches('form') ? $$('button', el) : [el];
    if (out) { out.className = 'result'; out.textContent = '…'; }
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const payload = body();
      const answer = await call(method, path, payload);
      if (out) { out.className = 'result ok'; out.textContent = said(answer); }
      flash(said(answer), true);
      if (el.matches('form')) el.classList.remove('dirty');
      if (el.dataset.then === 'follow' && answer && answer.task_id !== undefined) follow(answer.task_id);
      if (document.activeElement && el.contains(document.activeElement)) document.activeElement.blur();
      refreshAll();
    } catch (e) {
      if (out) { out.className = 'result error'; out.textContent = e.message; }
      flash(e.message, false);
    } finally {
      buttons.forEach((b) => { if (!b.hasAttribute('data-done')) b.disabled = false; });
      gate(el.parentElement || document);
    }
  }

  document.addEventListener('submit', (ev) => {
    const form = ev.target.closest('form[data-api]');
    if (!form) return;
    ev.preventDefault();
    act(form, form.dataset.api, () => formBody(form));
  });

  document.addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-api]');
    if (button && !button.form) { act(button, button.dataset.api, () => undefined); return; }
    const page = ev.target.closest('a[data-page]');
    if (page) {
      ev.preventDefault();
      const part = page.closest('[data-part]');
      part.dataset.part = page.dataset.page;
      history.replaceState(null, '', `${location.pathname}?${page.dataset.page.split('?')[1] || ''}`);
      loadPart(part);
    }
  });

  document.addEventListener('focusout', () => {
    setTimeout(() => { for (const el of $$('[data-part][data-stale]')) if (!busyEditing(el)) schedule(el); }, 0);
  });

  // The task filter: a new status starts from the newest page.
  document.addEventListener('change', (ev) => {
    const select = ev.target.closest('#task-filter select');
    if (!select) return;
    const part = $('#tasks-part');
    const query = select.value ? `offset=0&status=${encodeURIComponent(select.value)}` : 'offset=0';
    part.dataset.part = `/ui/part/tasks?${query}`;
    history.replaceState(null, '', `/ui/tasks?${query}`);
    select.blur();
    loadPart(part);
  });

  // Code editors: Tab indents (Shift+Tab dedents); Esc lets the next Tab leave the field.
  document.addEventListener('keydown', (ev) => {
    const ta = ev.target;
    if (!(ta instanceof HTMLTextAreaElement) || !ta.hasAttribute('data-tab')) return;
    if (ev.key === 'Escape') { ta.dataset.tabLeaves = '1'; return; }
    if (ev.key !== 'Tab' || ev.ctrlKey || ev.altKey || ev.metaKey || ta.dataset.tabLeaves) return;
    ev.preventDefault();
    const { selectionStart: start, selectionEnd: end, value } = ta;
    if (ev.shiftKey) {
      const lineStart = value.lastIndexOf('\n', start - 1) + 1;
      const spaces = /^ {1,4}/.exec(value.slice(lineStart));
      if (!spaces) return;
      ta.setRangeText('', lineStart, lineStart + spaces[0].length, 'preserve');
      ta.selectionStart = ta.selectionEnd = Math.max(lineStart, start - spaces[0].length);
    } else if (!document.execCommand('insertText', false, '    ')) {
      ta.setRangeText('    ', start, end, 'end');
    }
    ta.dispatchEvent(new Event('input', { bubbles: true }));
  });
  document.addEventListener('focusin', (ev) => { if (ev.target.dataset) delete ev.target.dataset.tabLeaves; });

  // ---------------------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------------------
  $('#key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const token = form.token.value.trim();
    if (!token) return;
    saveKey({ token, secret: form.secret.value.trim() || null });
    location.reload();
  });
  $('#sign-out').addEventListener('click', () => { forgetKey(); location.reload(); });

  async function start() {
    if (authOn && !loadKey()) {
      feedState(false, 'no key');
      $('#who').textContent = 'signed out';
      gate(document);
      askForKey('');
      return;
    }
    try {
      role = (await call('GET', '/ui/part/session')).role;
    } catch (e) {
      $('#who').textContent = e.message;
      gate(document);
      return;
    }
    $('#who').textContent = authOn ? `key: ${role}` : 'no auth';
    $('#sign-out').hidden = !authOn;
    for (const el of $$('[data-part]')) {
      if (el.dataset.part && !el.innerHTML.trim()) loadPart(el); else decorate(el);
    }
    gate(document);
    loadOperations();
    connectFeed();
    setInterval(() => { if (!feedLive) refreshAll(); }, POLL_MS);
    // What no event announces (load, heartbeat ages, command outcomes) is fetched again
    // every `data-every` seconds.
    setInterval(() => {
      for (const el of $$('[data-every]')) {
        if (Date.now() - (el._last || 0) >= Number(el.dataset.every) * 1000) schedule(el);
      }
    }, 1000);
  }

  start();
})();
