// fedge dashboard: renders the server's snapshots (Server-Sent Events) as text.
// Rule: everything from a snapshot reaches the page through textContent or a
// numeric property, never as markup (no innerHTML, no insertAdjacentHTML).
"use strict";

(function () {
  const byId = (id) => document.getElementById(id);

  function text(value, fallback) {
    if (value === null || value === undefined || value === "") return fallback === undefined ? "\u2013" : fallback;
    return String(value);
  }

  function number(value, digits) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "\u2013";
  }

  function age(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "\u2013";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return Math.round(seconds / 3600) + " h";
  }

  function cell(row, value, className) {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function fill(tableId, items, makeRow) {
    const body = byId(tableId).tBodies[0];
    const rows = items.map((item) => {
      const tr = document.createElement("tr");
      makeRow(tr, item);
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function reasons(counts) {
    const entries = Object.entries(counts || {});
    return entries.length ? entries.map(([k, v]) => k + " " + v).join(", ") : "none";
  }

  function render(s) {
    byId("fleet").textContent = s.fleet;
    const sum = s.summary;
    byId("online").textContent = sum.online + " / " + sum.devices;
    byId("round").textContent = sum.round === null ? "\u2013" : sum.round + (sum.collecting ? " (collecting)" : "");
    byId("round").dataset.round = sum.round === null ? "" : String(sum.round);
    byId("regions-count").textContent = String(sum.regions);
    byId("versions-summary").textContent = s.versions.map((v) => text(v.model, "?") + " v" + text(v.version, "?")
      + " \u00d7" + v.devices).join(", ") || "\u2013";

    const problems = s.problems.length ? s.problems : ["none"];
    byId("problems").replaceChildren(...problems.map((p) => {
      const li = document.createElement("li");
      li.textContent = p;
      return li;
    }));

    fill("regions", s.regions, (tr, r) => {
      cell(tr, text(r.region));
      cell(tr, r.online + " / " + r.devices);
      cell(tr, text(r.round));
      cell(tr, text(r.accepted));
      cell(tr, r.aggregators ? r.aggregators_connected + " / " + r.aggregators + " connected"
        + (r.pending_aggregate ? ", aggregate waiting" : "") : "no endpoint");
      cell(tr, text(r.bridge, "unknown"));
      cell(tr, r.accuracy === null ? "\u2013" : number(r.accuracy, 3) + " (" + r.accuracy_round + ")");
    });

    fill("rounds", s.rounds, (tr, r) => {
      cell(tr, text(r.aggregator));
      cell(tr, String(r.round));
      cell(tr, String(r.accepted));
      cell(tr, String(r.duplicate));
      cell(tr, reasons(r.rejected));
    });

    fill("release", s.release.releases, (tr, r) => {
      cell(tr, "v" + r.version);
      cell(tr, r.devices + " / " + s.release.fleet_devices);
      cell(tr, String(r.installed));
      cell(tr, String(r.running));
      cell(tr, String(r.failed));
      const progress = document.createElement("progress");
      progress.max = Math.max(1, s.release.fleet_devices);
      progress.value = r.running;
      cell(tr, "").appendChild(progress);
      cell(tr, reasons(r.states));
    });
    byId("backends").textContent = "training backends: " + reasons(s.backends) + ".";

    const rollout = s.rollout;
    byId("rollout-note").textContent = rollout === null ? "not configured (no release root of trust)"
      : rollout.error ? "release metadata refused: " + rollout.error + " (nothing from it is shown)"
        : rollout.timestamp_version === null ? "waiting for release metadata on the broker (none published yet)"
        : "From the TUF metadata the root broker retains, verified (timestamp version "
          + text(rollout.timestamp_version) + ")" + (rollout.releases.length ? "." : "; no release yet.");
    fill("rollout", rollout === null || rollout.error ? [] : rollout.releases, (tr, r) => {
      tr.dataset.release = String(r.release);
      cell(tr, String(r.release), "release");
      cell(tr, text(r.model, "?") + " v" + r.version, "bundle");
      cell(tr, r.stage, "stage");
      cell(tr, text(r.reason), "why");
      cell(tr, r.decided_ms === null ? "\u2013" : new Date(r.decided_ms).toLocaleString(), "decided");
      cell(tr, r.canary + (r.targeted === null ? "" : " of " + r.targeted)
        + (r.canary_share === null ? "" : " (" + (100 * r.canary_share).toFixed(1) + "%)"), "canary");
      cell(tr, text(r.targets), "targets");
      cell(tr, new Date(r.expires_ms).toLocaleString() + (r.expired ? " (expired)" : ""), "expires");
    });

    byId("devices-note").textContent = s.devices_left_out
      ? "Showing " + s.devices.length + " devices (offline and failing first); " + s.devices_left_out + " more not shown."
      : "";
    fill("devices", s.devices, (tr, d) => {
      tr.dataset.device = d.device;
      if (!d.online) tr.className = "offline";
      else if (d.failing) tr.className = "failing";
      cell(tr, d.device, "device");
      cell(tr, text(d.region));
      cell(tr, d.online ? "online" : "offline", "online");
      cell(tr, text(d.model, "?") + " v" + text(d.version, "?"), "version");
      cell(tr, text(d.backend));
      cell(tr, text(d.round), "round");
      cell(tr, text(d.round_status));
      cell(tr, d.loss === null ? text(d.loss_text) : number(d.loss, 4));
      cell(tr, number(d.accuracy, 3), "accuracy");
      cell(tr, number(d.free_mb, 0));
      const rel = d.release;
      cell(tr, rel.state === "idle" ? "idle" : rel.state + (rel.version === null ? "" : " v" + rel.version)
        + (rel.progress ? " " + rel.progress + "%" : ""), "release");
      cell(tr, [d.reason, rel.reason].filter((x) => x).join(" / "), "reason");
      cell(tr, age(d.seen_s));
    });

    fill("aggregators", s.aggregators, (tr, a) => {
      cell(tr, text(a.name));
      cell(tr, a.up ? "up" : "down: " + text(a.error));
      cell(tr, a.up ? (a.connected ? "connected" : "disconnected") : "\u2013");
      cell(tr, a.up ? text(a.round) + (a.collecting ? " (collecting, " + a.accepted + " accepted)" : "") : "\u2013");
      cell(tr, a.up ? String(a.accepted_total) : "\u2013");
      cell(tr, a.up ? reasons(a.rejected_total) : "\u2013");
      cell(tr, a.up ? String(a.inbox_dropped + a.service_dropped) : "\u2013");
      cell(tr, a.up && a.tier === "regional" ? (a.pending_aggregate ? "yes" : "no") : "\u2013");
    });
    byId("refused").textContent = "Messages refused by the dashboard (bad signature, unknown device, malformed): "
      + reasons(s.refused_messages) + "; MQTT " + (s.sources.mqtt_connected === null ? "not configured"
        : (s.sources.mqtt_connected ? "connected" : "disconnected")) + ".";

    for (const [id, name] of [["plot-accuracy", "accuracy.svg"], ["plot-updates", "updates.svg"]]) {
      const img = byId(id);
      const src = "/plots/" + name + "?v=" + encodeURIComponent(String(s.version));
      if (img.getAttribute("src") !== src) img.setAttribute("src", src);
    }
    byId("footer").textContent = s.sources.history_note + ". Updated " + new Date(s.generated_at * 1000).toLocaleTimeString()
      + " (snapshot " + s.version + ").";
    document.body.dataset.version = String(s.version);
  }

  function connect() {
    const live = byId("live");
    const events = new EventSource("/events");
    events.addEventListener("snapshot", (event) => {
      try {
        render(JSON.parse(event.data));
        live.textContent = "live";
        live.className = "live ok";
      } catch (err) {
        live.textContent = "could not show an update: " + err;
        live.className = "live down";
      }
    });
    events.onerror = () => {
      live.textContent = "disconnected, retrying\u2026";
      live.className = "live down";
    };
  }

  connect();
})();
