// live.js: keeps a server-rendered page live over one websocket. Hand-written, no build step.
//
// The server holds the view's state; this script only
//  - joins the view named by <body data-view> and says which message it has last (resume),
//  - applies the server's frames: "msg" inserts or updates one message (by id and data-rev),
//    "reset" replaces the list, "morph" replaces one region, "typing" says who types,
//    "ack" answers a command,
//  - sends commands (send, edit, delete) with an id made once per command: a resend after a
//    reconnect, or after an "unknown" ack (retried with back-off), posts once,
//  - marks the reader's own messages (edit/delete controls) and mentions of them, counts
//    unread messages in the title while the tab is hidden,
//  - reconnects with back-off and jitter, and shows the connection state on
//    <body data-live> and in the role="status" element.
// Frames from the server are a JSON header line, optionally followed by raw HTML after "\n".
"use strict";

(() => {
  const body = document.body;
  const view = body.dataset.view;
  if (!["room", "lobby", "dashboard"].includes(view)) return;

  // ---- search: results shown as one types (the form alone works without this) ----
  const searchForm = document.getElementById("search");
  const searchPanel = document.getElementById("search-panel");
  if (searchForm && searchPanel) {
    const input = searchForm.elements.namedItem("q");
    let timer = null;
    let latest = 0;
    const run = async () => {
      const asked = ++latest;
      if (!input.value.trim()) {
        searchPanel.replaceChildren();
        return;
      }
      try {
        const response = await fetch("/search?" + new URLSearchParams(new FormData(searchForm)));
        const html = await response.text();
        if (asked !== latest) return; // an answer to an older input
        if (response.status === 429) {
          searchPanel.textContent = html.trim(); // the limit, in words
          return;
        }
        const region = new DOMParser().parseFromString(html, "text/html").getElementById("search-results-region");
        searchPanel.replaceChildren(...(region ? [document.importNode(region, true)] : []));
      } catch {
        if (asked === latest) searchPanel.textContent = "Search is unavailable right now.";
      }
    };
    input.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(run, 200);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        input.value = "";
        run();
      }
    });
    // Enter (or the button) opens the results page, as without the script.
  }

  // An older page (a search result opens one): shown as rendered, the result in view; not
  // live, since the live view follows the latest messages.
  if (view === "room" && new URLSearchParams(location.search).has("before")) {
    const target = location.hash && document.getElementById(location.hash.slice(1));
    if (target) target.scrollIntoView({ block: "center" });
    body.dataset.live = "history";
    const statusEl = document.getElementById("status");
    if (statusEl) statusEl.textContent = "Older messages (not live)";
    return;
  }

  const me = body.dataset.me || "";
  const statusEl = document.getElementById("status");
  const log = document.getElementById("messages");
  const form = document.getElementById("send");
  const textarea = form && form.elements.namedItem("message");
  const button = form && form.querySelector("button[type=submit]");
  const composerError = document.getElementById("composer-error");
  const typingEl = document.getElementById("typing");
  // Phoenix's reconnect schedule, then every 5 s; each delay gets ±50 % jitter.
  const BACKOFF = [10, 50, 100, 150, 200, 250, 500, 1000, 2000];
  const RETRY = [250, 500, 1000, 2000, 4000, 8000]; // an "unknown" command, same id
  const HEARTBEAT_MS = 30000;
  const baseTitle = document.title;

  let socket = null;
  let attempts = 0;
  let joined = false;
  let lastPos = log ? Number(log.dataset.lastPos || 0) : 0;
  let nextRef = 1;
  const commands = new Map(); // ref -> { frame, retries, onDone }: awaiting their ack
  let sending = null; // the composer's command, if one is in flight
  let heartbeat = null;
  let silentSince = Date.now();
  let paused = false; // set by liveSocket.disconnect(): no reconnect until connect()
  let unread = 0;
  let typingSentAt = 0;
  const early = new Map(); // pos -> html: updates of messages not on the page yet (older pages)

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

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN && joined) socket.send(JSON.stringify(frame));
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
        for (const command of commands.values()) send(command.frame); // same ids: posted once
        break;
      case "msg":
        upsert(html, head.pos);
        break;
      case "reset":
        resetLog(html, head.pos, head.more);
        break;
      case "morph": {
        const el = document.getElementById(head.id);
        if (el && !el.contains(document.activeElement)) el.innerHTML = html;
        break;
      }
      case "typing":
        showTyping(head.names || []);
        break;
      case "ack":
        acked(head);
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

  // Whether the reader is among those who reacted with this button's emoji.
  function reactedByMe(b) {
    return (b.dataset.by || "").split("\n").includes(me);
  }

  // The reader's own messages get their controls; messages that mention the reader a mark;
  // the reader's own reactions are shown pressed.
  function decorate(li) {
    localTimes(li);
    for (const b of li.querySelectorAll("[data-react]")) b.setAttribute("aria-pressed", String(reactedByMe(b)));
    if (li.querySelector(`.mention[data-name="${CSS.escape(me)}"]`)) li.classList.add("mentions-me");
    if (li.dataset.sender === me && !("deleted" in li.dataset) && !li.querySelector(".actions")) {
      const actions = document.createElement("span");
      actions.className = "actions";
      for (const [action, label] of [["edit", "Edit"], ["delete", "Delete"]]) {
        const b = document.createElement("button");
        b.type = "button";
        b.dataset.action = action;
        b.textContent = label;
        actions.append(b, " ");
      }
      li.append(" ", actions);
    }
  }

  function fromHtml(html) {
    const t = document.createElement("template");
    t.innerHTML = html;
    return t.content.firstElementChild;
  }

  // A message's state: replaces the one on the page if newer, appends a new one, or is kept
  // for an older page still loading.
  function upsert(html, pos) {
    const existing = document.getElementById(`m-${pos}`);
    if (existing) return replace(existing, html);
    if (pos <= lastPos) {
      early.set(pos, html);
      if (early.size > 200) early.delete(early.keys().next().value);
      return;
    }
    const follow = pinned();
    log.insertAdjacentHTML("beforeend", html);
    if (log.lastElementChild) decorate(log.lastElementChild);
    lastPos = pos;
    log.dataset.lastPos = String(pos);
    if (follow) log.scrollTop = log.scrollHeight;
    const li = log.lastElementChild;
    if (document.hidden && li && li.dataset.sender !== me) {
      unread += 1;
      document.title = `(${unread}) ${baseTitle}`;
    }
  }

  function replace(existing, html) {
    const next = fromHtml(html);
    if (!next || Number(next.dataset.rev) <= Number(existing.dataset.rev)) return;
    if (existing.querySelector("textarea.edit") && !("deleted" in next.dataset)) {
      existing.dataset.rev = next.dataset.rev; // being edited here: keep the field
      return;
    }
    existing.replaceWith(next);
    decorate(next);
  }

  function resetLog(html, pos, more) {
    log.innerHTML = html;
    for (const li of log.children) decorate(li);
    lastPos = pos;
    log.dataset.lastPos = String(pos);
    const first = log.firstElementChild;
    log.dataset.firstPos = first ? first.dataset.pos : "0";
    log.dataset.firstVersion = first ? first.dataset.version : "0";
    log.dataset.hasMore = String(more);
    log.scrollTop = log.scrollHeight;
  }

  let loadingOlder = false;
  async function loadOlder() {
    if (loadingOlder || log.dataset.hasMore !== "true") return;
    loadingOlder = true;
    try {
      const before = log.dataset.firstPos;
      const version = log.dataset.firstVersion;
      const response = await fetch(`/${body.dataset.room}/older?before=${before}&v=${version}`);
      if (!response.ok) return;
      const html = await response.text();
      const height = log.scrollHeight;
      const firstBefore = log.firstElementChild;
      log.insertAdjacentHTML("afterbegin", html);
      for (let li = log.firstElementChild; li && li !== firstBefore; li = li.nextElementSibling) {
        decorate(li);
        const update = early.get(Number(li.dataset.pos));
        if (update) replace(li, update);
      }
      log.scrollTop += log.scrollHeight - height; // keep what the reader sees in place
      const first = log.firstElementChild;
      if (first) {
        log.dataset.firstPos = first.dataset.pos;
        log.dataset.firstVersion = first.dataset.version;
      }
      log.dataset.hasMore = response.headers.get("x-has-more") || "false";
      const link = document.getElementById("older");
      if (link && log.dataset.hasMore !== "true") link.textContent = "";
    } finally {
      loadingOlder = false;
    }
  }

  // ---- who is typing ----

  function showTyping(names) {
    const others = names.filter((name) => name !== me);
    typingEl.dataset.typing = others.join(",");
    if (others.length === 0) typingEl.textContent = "";
    else if (others.length === 1) typingEl.textContent = `${others[0]} is typing…`;
    else if (others.length === 2) typingEl.textContent = `${others[0]} and ${others[1]} are typing…`;
    else typingEl.textContent = `${others[0]}, ${others[1]} and ${others.length - 2} more are typing…`;
  }

  // ---- commands ----

  // Sends a command and calls onDone(ack) once it is stored or refused; an "unknown" ack is
  // retried with the same id after a back-off.
  function command(frame, onDone) {
    const ref = nextRef++;
    const entry = { frame: { ...frame, ref, id: newId() }, retries: 0, onDone };
    commands.set(ref, entry);
    send(entry.frame); // if the socket is down, it is sent on the next join
    return entry;
  }

  function acked(head) {
    const entry = commands.get(head.ref);
    if (!entry) return;
    if (head.status === "unknown") {
      const delay = RETRY[Math.min(entry.retries, RETRY.length - 1)];
      entry.retries += 1;
      if (entry === sending) {
        composerError.textContent = "Not confirmed yet; retrying…";
        button.textContent = "Retrying…";
      }
      setTimeout(() => commands.has(head.ref) && send(entry.frame), delay * (0.75 + Math.random() / 2));
      return;
    }
    commands.delete(head.ref);
    entry.onDone(head);
  }

  function sent(text, head) {
    sending = null;
    button.disabled = false;
    button.textContent = "Send";
    if (head.ok) {
      composerError.textContent = "";
      // Cleared only by the acknowledgement, and only if the text is still what was sent.
      if (textarea.value === text) textarea.value = "";
      sessionStorage.removeItem(draftKey());
    } else {
      composerError.textContent = head.error;
    }
    textarea.focus();
  }

  function startEdit(li) {
    const bodyEl = li.querySelector(".body");
    if (!bodyEl || li.querySelector("textarea.edit")) return;
    const field = document.createElement("textarea");
    field.className = "edit";
    field.rows = 2;
    field.value = bodyEl.textContent;
    field.setAttribute("aria-label", "Edit message");
    bodyEl.hidden = true;
    bodyEl.after(field);
    field.focus();
    field.setSelectionRange(field.value.length, field.value.length);
    const finish = () => {
      field.remove();
      bodyEl.hidden = false;
    };
    field.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        finish();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (field.value === bodyEl.textContent) return finish();
        field.disabled = true;
        command({ t: "edit", version: Number(li.dataset.version), message: field.value }, (head) => {
          finish();
          if (!head.ok) composerError.textContent = head.error;
        });
      }
    });
  }

  function draftKey() {
    return `livechat-draft:${body.dataset.room}`;
  }

  if (view === "room") {
    const draft = sessionStorage.getItem(draftKey());
    if (draft && !textarea.value) textarea.value = draft;
    textarea.addEventListener("input", () => {
      sessionStorage.setItem(draftKey(), textarea.value);
      const now = Date.now();
      if (textarea.value && now - typingSentAt >= 1000) {
        typingSentAt = now;
        send({ t: "typing" });
      }
    });
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (sending) return; // one message at a time; a double Enter sends once
      const text = textarea.value;
      if (!text.trim()) {
        composerError.textContent = "the message is empty";
        return;
      }
      button.disabled = true;
      button.textContent = "Sending…";
      composerError.textContent = "";
      typingSentAt = 0;
      sending = command({ t: "send", message: text }, (head) => sent(text, head));
    });
    log.addEventListener("click", (event) => {
      const react = event.target.closest("[data-react]");
      const reactLi = react && react.closest("li.msg");
      if (reactLi) {
        react.disabled = true;
        const frame = { t: "react", version: Number(reactLi.dataset.version), emoji: react.dataset.react, add: !reactedByMe(react) };
        command(frame, (head) => {
          react.disabled = false;
          if (!head.ok) composerError.textContent = head.error;
        });
        return;
      }
      const action = event.target.closest("[data-action]");
      const li = action && action.closest("li.msg");
      if (!li) return;
      if (action.dataset.action === "edit") startEdit(li);
      if (action.dataset.action === "delete") {
        action.disabled = true;
        command({ t: "delete", version: Number(li.dataset.version) }, (head) => {
          action.disabled = false;
          if (!head.ok) composerError.textContent = head.error;
        });
      }
    });
    log.addEventListener("scroll", () => {
      if (log.scrollTop < 80) loadOlder();
    });
    const link = document.getElementById("older");
    if (link) link.addEventListener("click", (event) => {
      event.preventDefault();
      loadOlder();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) {
        unread = 0;
        document.title = baseTitle;
      }
    });
    for (const li of log.children) decorate(li);
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
