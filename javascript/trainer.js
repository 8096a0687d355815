// sd-webui-trainer: the Trainer tab's page script. Polls /trainer/v1/jobs (the job panel; the list lives on the
// server, so a reloaded page attaches to the running or latest job) and /trainer/v1/jobs/{id} for the job shown
// (progress, loss chart with a smoothed line, previews newest first); sets the tooltips; reads txt2img's settings.
// Every user-visible string goes through trainerT (the WebUI's localisation). Everything is namespaced "trainer".

(function() {
    var FINISHED = ["done", "failed", "interrupted", "cancelled"];
    var trainerState = {jobId: "", since: 0, history: [], previews: 0, done: false, timer: null, attached: false};

    function trainerT(text) {
        if (typeof getTranslation === "function") {
            var translated = getTranslation(text);
            if (translated) return translated;
        }
        return text;
    }
    window.trainerT = trainerT;

    function trainerEl(id) {
        return gradioApp().getElementById(id);
    }

    function trainerEscape(text) {
        return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
    }

    function trainerInput(id) {
        var box = trainerEl(id);
        return box ? box.querySelector("textarea, input") : null;
    }

    function trainerSetInput(id, value) {
        var input = trainerInput(id);
        if (!input) return;
        input.value = value;
        if (typeof updateInput === "function") updateInput(input);
    }

    // ---- the loss chart: raw losses thin, their exponential moving average thick
    function trainerSmoothed(rows, key) {
        var out = [], avg = null, n = 0;
        rows.forEach(function(r) {
            n += 1;
            var weight = Math.max(0.05, 1 / n);  // starts as a plain mean, then a 0.05 EMA
            avg = avg == null ? r[key] : avg + weight * (r[key] - avg);
            out.push({step: r.step, value: avg});
        });
        return out;
    }

    function trainerDrawChart(canvas, history) {
        var ratio = window.devicePixelRatio || 1;
        var cssWidth = canvas.clientWidth || 640;
        if (canvas.width !== Math.round(cssWidth * ratio)) {
            canvas.width = Math.round(cssWidth * ratio);
            canvas.height = Math.round(220 * ratio);
        }
        var ctx = canvas.getContext("2d");
        ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
        var w = cssWidth, h = 220, left = 48, top = 8, bottom = 22;
        ctx.clearRect(0, 0, w, h);
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#888";
        if (history.length < 2) {
            ctx.fillText(trainerT("The loss chart appears after the first steps."), left, h / 2);
            return;
        }
        var losses = [];
        history.forEach(function(r) {
            [r.loss, r.loss_instance, r.loss_prior].forEach(function(v) { if (v != null && isFinite(v)) losses.push(v); });
        });
        losses.sort(function(a, b) { return a - b; });
        var lo = losses[0], hi = losses[Math.floor(0.98 * (losses.length - 1))];  // one spike does not flatten it
        if (hi <= lo) hi = lo + 1e-9;
        var s0 = history[0].step, s1 = history[history.length - 1].step;
        var x = function(step) { return left + (w - left - 6) * (step - s0) / Math.max(1, s1 - s0); };
        var y = function(v) { return top + (h - top - bottom) * (1 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)); };
        ctx.strokeStyle = "rgba(128,128,128,0.5)";
        ctx.strokeRect(left, top, w - left - 6, h - top - bottom);
        ctx.fillText(hi.toPrecision(3), 2, top + 8);
        ctx.fillText(lo.toPrecision(3), 2, h - bottom);
        ctx.fillText(trainerT("step") + " " + s0, left, h - 6);
        var last = trainerT("step") + " " + s1;
        ctx.fillText(last, w - 6 - ctx.measureText(last).width, h - 6);
        var lines = [["loss", "#f97316"], ["loss_instance", "#3b82f6"], ["loss_prior", "#22c55e"]];
        lines.forEach(function(line, index) {
            var rows = history.filter(function(r) { return r[line[0]] != null && isFinite(r[line[0]]); });
            if (rows.length < 2) return;
            var draw = function(points, width, alpha) {
                ctx.globalAlpha = alpha;
                ctx.lineWidth = width;
                ctx.strokeStyle = line[1];
                ctx.beginPath();
                points.forEach(function(p, i) {
                    if (i === 0) ctx.moveTo(x(p.step), y(p.value)); else ctx.lineTo(x(p.step), y(p.value));
                });
                ctx.stroke();
                ctx.globalAlpha = 1;
            };
            draw(rows.map(function(r) { return {step: r.step, value: r[line[0]]}; }), 1, 0.35);
            draw(trainerSmoothed(rows, line[0]), 2.5, 1);
            var label = {loss: trainerT("loss (smoothed)"), loss_instance: trainerT("instance"),
                loss_prior: trainerT("prior")}[line[0]];
            ctx.fillStyle = line[1];
            ctx.fillText(label, w - 6 - ctx.measureText(label).width, top + 14 + 13 * index);
        });
    }

    // ---- the job shown: progress line, chart, previews
    function trainerRender(job) {
        var bar = trainerEl("trainer_progress");
        if (bar) {
            var pct = job.total_steps ? Math.round(100 * job.step / job.total_steps) : 0;
            var parts = [trainerT(job.state) + (job.status ? " (" + trainerEscape(job.status) + ")" : ""),
                trainerT("step") + " " + job.step + "/" + job.total_steps];
            if (job.loss != null) parts.push(trainerT("loss") + " " + Number(job.loss).toFixed(5));
            if (job.steps_per_s) parts.push(job.steps_per_s.toFixed(2) + " it/s");
            if (job.eta_s != null && FINISHED.indexOf(job.state) < 0) parts.push(trainerT("ETA") + " " + trainerDuration(job.eta_s));
            var err = job.error ? '<div class="trainer-error">' + trainerEscape(job.error) + "</div>" : "";
            bar.innerHTML = '<div class="trainer-bar"><div style="width:' + pct + '%"></div></div>' +
                '<div class="trainer-text">' + trainerT("Job") + " " + trainerEscape(job.id) + ": " +
                parts.join(", ") + "</div>" + err;
        }
        trainerState.history = trainerState.history.concat(job.history);
        if (job.history.length) trainerState.since = job.history[job.history.length - 1].step;
        var canvas = trainerEl("trainer_loss_chart");
        if (canvas) trainerDrawChart(canvas, trainerState.history);
        var gallery = trainerEl("trainer_previews");
        if (gallery && job.previews.length > trainerState.previews) {
            for (var i = trainerState.previews; i < job.previews.length; i++) {
                var figure = document.createElement("figure");
                if (job.method === "test_grid") figure.className = "trainer-grid-figure";
                var img = document.createElement("img");
                img.src = "./trainer/v1/jobs/" + encodeURIComponent(job.id) + "/previews/" + job.previews[i].index;
                img.alt = trainerT("step") + " " + job.previews[i].step;
                img.onclick = function() { window.open(this.src, "_blank"); };
                var caption = document.createElement("figcaption");
                caption.textContent = job.method === "test_grid" ? trainerT("test grid: saved steps x strength") :
                    trainerT("step") + " " + job.previews[i].step;
                figure.appendChild(img);
                figure.appendChild(caption);
                gallery.insertBefore(figure, gallery.firstChild);  // newest first
            }
            trainerState.previews = job.previews.length;
        }
    }

    function trainerDuration(seconds) {
        seconds = Math.round(seconds);
        if (seconds < 60) return seconds + " s";
        var m = Math.floor(seconds / 60), s = seconds % 60;
        if (m < 60) return m + " min " + s + " s";
        return Math.floor(m / 60) + " h " + (m % 60) + " min";
    }

    // the WebUI's extra-networks panels list files when built; press their refresh so new files show up
    function trainerRefreshPanels(method) {
        var page = {lora: "lora", hypernetwork: "hypernetworks", dreambooth: "checkpoints"}[method] || "textual_inversion";
        ["txt2img", "img2img"].forEach(function(tab) {
            var button = gradioApp().querySelector("#" + tab + "_" + page + "_extra_refresh");
            if (button) button.click();
        });
    }

    function trainerShow(id) {
        trainerState = {jobId: id, since: 0, history: [], previews: 0, done: false, timer: trainerState.timer,
            attached: true};
        var gallery = trainerEl("trainer_previews");
        if (gallery) gallery.innerHTML = "";
        var input = trainerInput("trainer_job_id");
        if (input && input.value !== id) trainerSetInput("trainer_job_id", id);
    }

    function trainerPollJob() {
        var input = trainerInput("trainer_job_id");
        var id = input ? input.value : "";
        if (!id) return;
        if (id !== trainerState.jobId) trainerShow(id);
        if (trainerState.done) return;
        fetch("./trainer/v1/jobs/" + encodeURIComponent(id) + "?since=" + trainerState.since)
            .then(function(r) { return r.ok ? r.json() : null; })
            .then(function(job) {
                if (!job || job.id !== trainerState.jobId) return;
                trainerRender(job);
                trainerState.done = FINISHED.indexOf(job.state) >= 0;
                if (trainerState.done && job.saved.length) trainerRefreshPanels(job.method);
            })
            .catch(function() {});
    }

    // ---- the job panel
    function trainerJobAction(verb, id) {
        if (verb === "show") {
            trainerShow(id);
            return;
        }
        trainerSetInput("trainer_job_action", verb + ":" + id);
        var button = trainerEl("trainer_job_action_button");
        if (button) button.click();
    }
    window.trainerJobAction = trainerJobAction;

    function trainerRenderJobs(jobs) {
        var panel = trainerEl("trainer_jobs_list");
        if (!panel) return;
        if (!jobs.length) {
            panel.innerHTML = '<div class="trainer-jobs-empty">' + trainerT("No jobs yet in this WebUI session.") + "</div>";
            return;
        }
        var rows = jobs.slice().reverse().map(function(job) {
            var id = trainerEscape(job.id);
            var files = job.saved.map(function(s) { return s.path.split(/[\\/]/).pop(); });
            var shownFiles = files.slice(-2).map(trainerEscape).join("<br>") + (files.length > 2 ? "<br>+" + (files.length - 2) : "");
            var buttons = '<button class="trainer-job-show" onclick="trainerJobAction(\'show\', \'' + id + '\')">' +
                trainerT("Show") + "</button>";
            if (job.state === "queued" || job.state === "running") {
                buttons += '<button class="trainer-job-cancel" onclick="trainerJobAction(\'cancel\', \'' + id + '\')">' +
                    trainerT(job.state === "queued" ? "Cancel" : "Interrupt") + "</button>";
            }
            if (job.state === "done" && (job.method === "lora" || job.method === "textual_inversion") && !job.preflight) {
                buttons += '<button class="trainer-job-grid" title="' + trainerT("Render the saved steps as a grid") +
                    '" onclick="trainerJobAction(\'grid\', \'' + id + '\')">' + trainerT("Test it") + "</button>";
            }
            if (job.output_dir) {
                buttons += '<button class="trainer-job-open" title="' + trainerEscape(job.output_dir) +
                    '" onclick="trainerJobAction(\'open\', \'' + id + '\')">' + trainerT("Open folder") + "</button>";
            }
            var current = job.id === trainerState.jobId ? ' class="trainer-job-current"' : "";
            return "<tr" + current + "><td>" + trainerEscape(job.method) + (job.preflight ? " (" + trainerT("memory check") + ")" : "") +
                "<br><small>" + id + "</small></td><td class=\"trainer-state-" + trainerEscape(job.state) + "\">" +
                trainerT(job.state) + "</td><td>" + job.step + "/" + job.total_steps + "</td><td>" +
                (job.loss == null ? "-" : Number(job.loss).toFixed(4)) + "</td><td>" + (shownFiles || "-") +
                '</td><td class="trainer-job-buttons">' + buttons + "</td></tr>";
        });
        panel.innerHTML = '<div class="trainer-report-title">' + trainerT("Jobs") + "</div>" +
            '<table class="trainer-jobs-table"><tr><th>' + [trainerT("Job"), trainerT("State"), trainerT("Step"),
            trainerT("Loss"), trainerT("Files"), ""].join("</th><th>") + "</th></tr>" + rows.join("") + "</table>";
    }

    function trainerPollJobs() {
        fetch("./trainer/v1/jobs")
            .then(function(r) { return r.ok ? r.json() : null; })
            .then(function(body) {
                if (!body) return;
                trainerRenderJobs(body.jobs);
                // a new page: attach to the running job, else the newest one, so no run is orphaned
                var input = trainerInput("trainer_job_id");
                if (!trainerState.attached && input && !input.value && body.jobs.length) {
                    var running = body.jobs.filter(function(j) { return j.state === "running"; });
                    trainerShow((running.length ? running[0] : body.jobs[body.jobs.length - 1]).id);
                }
                trainerState.attached = true;
            })
            .catch(function() {});
    }

    // ---- tooltips from the tab's data block (every setting's short explanation)
    // (set on every tick: gradio mounts the controls of a folded group only when it first opens)
    var trainerTips = null;
    function trainerSetTips() {
        if (trainerTips === null) {
            var data = trainerEl("trainer_tips_data");
            if (!data) return;
            trainerTips = JSON.parse(data.textContent);
        }
        Object.keys(trainerTips).forEach(function(id) {
            var el = trainerEl(id);
            if (el && trainerTips[id] && !el.title) el.title = trainerT(trainerTips[id]);
        });
    }

    // ---- "Use txt2img settings": the txt2img tab's current values, ours where one is not found
    window.trainerTxt2imgSettings = function(prompt, negative, sampler, steps, cfg, width, height, seed) {
        var value = function(id, fallback, selector) {
            var root = trainerEl(id);
            var input = root ? root.querySelector(selector || "textarea, input") : null;
            return input && input.value !== "" ? input.value : fallback;
        };
        var number = function(id, fallback) {  // gradio's Number takes numbers, not the box's text
            var parsed = parseFloat(value(id, fallback, "input[type=number], input"));
            return isFinite(parsed) ? parsed : fallback;
        };
        return [
            value("txt2img_prompt", prompt), value("txt2img_neg_prompt", negative),
            value("txt2img_sampling", sampler, "input"), number("txt2img_steps", steps),
            number("txt2img_cfg_scale", cfg), number("txt2img_width", width),
            number("txt2img_height", height), number("txt2img_seed", seed),
        ];
    };

    function trainerTick() {
        trainerSetTips();
        trainerPollJob();
        trainerState.ticks = (trainerState.ticks || 0) + 1;
        if (trainerState.ticks % 2 === 1) trainerPollJobs();
    }

    onUiLoaded(function() {
        if (!trainerState.timer) trainerState.timer = setInterval(trainerTick, 1000);
        trainerTick();
    });
})();
