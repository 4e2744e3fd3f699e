// live.js: keeps a server-rendered page live over one websocket. Hand-written, no build step.
//
// The server holds the view's state; this script only
//  - joins the view named by <body data-view> and says which message it has last (resume),
//  - applies the server's frames: "msg" appends one message, "reset" replaces the list,
//    "morph" replaces one region, "ack" answers a send,
//  - sends the composer's text with a command id made once per message (a resend after a
//    reconnect posts once),
//  - reconnects with back-off and jitter, and shows the connection state on
//    <body data-live> and in the role="status" element.
// Frames from the server are a JSON header line, optionally followed by raw HTML after "\n".
"use strict";

(() => {
  const body = document.body;
  const view = body.dataset.view;
  if (!["room", "lobby", "dashboard"].includes(view)) return;

  const statusEl = document.getElementById("status");
  const log = document.getElementById("messages");
  const form = document.getElementById("send");
  const textarea = form && form.elements.namedItem("message");
  const button = form && form.querySelector("button[type=submit]");
  const composerError = document.getElementById("composer-error");
  // Phoenix's reconnect schedule, then every 5 s; each delay gets ±50 % jitter.
  const BACKOFF = [10, 50, 100, 150, 200, 250, 500, 1000, 2000];
  const HEARTBEAT_MS = 30000;

  let socket = null;
  let attempts = 0;
  let joined = false;
  let lastPos = log ? Number(log.dataset.lastPos || 0) : 0;
  let nextRef = 1;
  let pending = null; // { ref, id, text }: the message awaiting its ack
  let heartbeat = null;
  let silentSince = Date.now();
  let paused = false; // set by liveSocket.disconnect(): no reconnect until connect()

  function setState(state, text) {
    body.dataset.live = state;
    if (statusEl) statusEl.textContent = text;
  }

  function newId() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function connect() {
    if (paused) return;
    setState("connecting", attempts ? "Reconnecting…" : "Connecting…");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}/live`);
    socket.onopen = () => {
      const join = { t: "join", view };
      if (view === "room") Object.assign(join, { room: body.dataset.room, after: lastPos });
      socket.send(JSON.stringify(join));
    };
    socket.onmessage = (event) => {
      silentSince = Date.now();
      const text = String(event.data);
      const nl = text.indexOf("\n");
      const head = JSON.parse(nl < 0 ? text : text.slice(0, nl));
      handle(head, nl < 0 ? "" : text.slice(nl + 1));
    };
    socket.onclose = () => {
      joined = false;
      clearInterval(heartbeat);
      if (paused) return setState("disconnected", "Disconnected");
      setState("disconnected", "Disconnected; reconnecting…");
      const base = BACKOFF[Math.min(attempts, BACKOFF.length - 1)];
      const delay = attempts >= BACKOFF.length ? 5000 : base;
      attempts += 1;
      setTimeout(connect, delay * (0.5 + Math.random()));
    };
  }

  function handle(head, html) {
    switch (head.t) {
      case "joined":
        joined = true;
        attempts = 0;
        setState("connected", "Connected");
        heartbeat = setInterval(() => {
          if (Date.now() - silentSince > 2 * HEARTBEAT_MS) return socket.close();
          socket.send('{"t":"ping"}');
        }, HEARTBEAT_MS);
        if (pending) sendPending(); // the same id: posted once even if it already was
        break;
      case "msg":
        if (head.pos > lastPos) append(html, head.pos);
        break;
      case "reset":
        resetLog(html, head.pos, head.more);
        break;
      case "morph": {
        const el = document.getElementById(head.id);
        if (el && !el.contains(document.activeElement)) el.innerHTML = html;
        break;
      }
      case "ack":
        if (pending && head.ref === pending.ref) acked(head);
        break;
      case "error":
        console.warn("live: server error:", head.error);
        if (!joined) {
          // A refused join (no name, bad room) will not get better by retrying: reload, and
          // the server renders what is needed (the name form).
          paused = true;
          setState("disconnected", head.error);
          setTimeout(() => location.reload(), 1000 + Math.random() * 1000);
        }
        break;
    }
  }

  // ---- the message log ----

  function pinned() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  }

  // Times are rendered in UTC on the server; show them in the reader's time zone.
  function localTimes(root) {
    for (const t of root.querySelectorAll("time[datetime]")) {
      const date = new Date(t.dateTime);
      if (!Number.isNaN(date.getTime())) {
        t.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      }
    }
  }

  function append(html, pos) {
    const follow = pinned();
    log.insertAdjacentHTML("beforeend", html);
    if (log.lastElementChild) localTimes(log.lastElementChild);
    lastPos = pos;
    log.dataset.lastPos = String(pos);
    if (follow) log.scrollTop = log.scrollHeight;
  }

  function resetLog(html, pos, more) {
    log.innerHTML = html;
    localTimes(log);
    lastPos = pos;
    log.dataset.lastPos = String(pos);
    const first = log.firstElementChild;
    log.dataset.firstPos = first ? first.dataset.pos : "0";
    log.dataset.hasMore = String(more);
    log.scrollTop = log.scrollHeight;
  }

  let loadingOlder = false;
  async function loadOlder() {
    if (loadingOlder || log.dataset.hasMore !== "true") return;
    loadingOlder = true;
    try {
      const before = log.dataset.firstPos;
      const response = await fetch(`/${body.dataset.room}/older?before=${before}`);
      if (!response.ok) return;
      const html = await response.text();
      const height = log.scrollHeight;
      log.insertAdjacentHTML("afterbegin", html);
      localTimes(log);
      log.scrollTop += log.scrollHeight - height; // keep what the reader sees in place
      const first = log.firstElementChild;
      if (first) log.dataset.firstPos = first.dataset.pos;
      log.dataset.hasMore = response.headers.get("x-has-more") || "false";
      const link = document.getElementById("older");
      if (link && log.dataset.hasMore !== "true") link.textContent = "";
    } finally {
      loadingOlder = false;
    }
  }

  // ---- the composer ----

  function sendPending() {
    if (socket && socket.readyState === WebSocket.OPEN && joined) {
      socket.send(JSON.stringify({ t: "send", ref: pending.ref, id: pending.id, message: pending.text }));
    }
  }

  function acked(head) {
    const sent = pending;
    pending = null;
    button.disabled = false;
    button.textContent = "Send";
    if (head.ok) {
      composerError.textContent = "";
      // Cleared only by the acknowledgement, and only if the text is still what was sent.
      if (textarea.value === sent.text) textarea.value = "";
      sessionStorage.removeItem(draftKey());
    } else {
      composerError.textContent = head.error;
    }
    textarea.focus();
  }

  function draftKey() {
    return `livechat-draft:${body.dataset.room}`;
  }

  if (view === "room") {
    const draft = sessionStorage.getItem(draftKey());
    if (draft && !textarea.value) textarea.value = draft;
    textarea.addEventListener("input", () => sessionStorage.setItem(draftKey(), textarea.value));
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (pending) return; // one message at a time; a double Enter sends once
      const text = textarea.value;
      if (!text.trim()) {
        composerError.textContent = "the message is empty";
        return;
      }
      pending = { ref: nextRef++, id: newId(), text };
      button.disabled = true;
      button.textContent = "Sending…";
      composerError.textContent = "";
      sendPending(); // if the socket is down, it is sent on the next join
    });
    log.addEventListener("scroll", () => {
      if (log.scrollTop < 80) loadOlder();
    });
    const link = document.getElementById("older");
    if (link) link.addEventListener("click", (event) => {
      event.preventDefault();
      loadOlder();
    });
    localTimes(log);
    log.scrollTop = log.scrollHeight;
  }

  // Like Phoenix's window.liveSocket: for the console and for end-to-end tests.
  window.liveSocket = {
    /** Closes the socket and stays offline until connect(). */
    disconnect() {
      paused = true;
      if (socket) socket.close();
    },
    /** Reconnects after disconnect(), resuming from the last message shown. */
    connect() {
      if (!paused) return;
      paused = false;
      attempts = 0;
      connect();
    },
    /** Drops the socket as a network failure would: the client reconnects by itself. */
    drop() {
      if (socket) socket.close();
    },
  };

  connect();
})();
