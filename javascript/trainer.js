// sd-webui-trainer: polls /trainer/v1/jobs/{id} while a job runs; draws progress, the loss chart and previews.
// Everything here is namespaced "trainer" (functions, element ids).

(function() {
    var trainerState = {jobId: "", since: 0, history: [], previews: 0, timer: null};

    function trainerEl(id) {
        return gradioApp().getElementById(id);
    }

    function trainerJobIdBox() {
        var box = trainerEl("trainer_job_id");
        return box ? box.querySelector("textarea, input") : null;
    }

    function trainerDrawChart(canvas, history) {
        var ctx = canvas.getContext("2d");
        var w = canvas.width, h = canvas.height, pad = 30;
        ctx.clearRect(0, 0, w, h);
        if (history.length < 2) return;
        var losses = [];
        history.forEach(function(r) {
            [r.loss, r.loss_instance, r.loss_prior].forEach(function(v) { if (v != null) losses.push(v); });
        });
        var lo = Math.min.apply(null, losses), hi = Math.max.apply(null, losses);
        if (hi === lo) hi = lo + 1e-9;
        var s0 = history[0].step, s1 = history[history.length - 1].step;
        ctx.strokeStyle = "#888";
        ctx.strokeRect(pad, 5, w - pad - 5, h - pad);
        ctx.fillStyle = "#888";
        ctx.font = "10px sans-serif";
        ctx.fillText(hi.toPrecision(3), 0, 12);
        ctx.fillText(lo.toPrecision(3), 0, h - pad);
        ctx.fillText("step " + s1, w - 70, h - 8);
        // the loss, and with prior preservation (DreamBooth) its instance and class parts
        [["loss", "#f97316"], ["loss_instance", "#3b82f6"], ["loss_prior", "#22c55e"]].forEach(function(line) {
            var rows = history.filter(function(r) { return r[line[0]] != null; });
            if (rows.length < 2) return;
            ctx.strokeStyle = line[1];
            ctx.beginPath();
            rows.forEach(function(r, i) {
                var x = pad + (w - pad - 5) * (r.step - s0) / Math.max(1, s1 - s0);
                var v = Math.min(hi, Math.max(lo, r[line[0]]));
                var y = 5 + (h - pad) * (1 - (v - lo) / (hi - lo));
                if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
            });
            ctx.stroke();
            if (line[0] !== "loss") ctx.fillText(line[0].replace("loss_", ""), w - 70, line[0] === "loss_prior" ? 34 : 22);
        });
    }

    function trainerRender(job) {
        var bar = trainerEl("trainer_progress");
        if (bar) {
            var pct = job.total_steps ? Math.round(100 * job.step / job.total_steps) : 0;
            var eta = job.eta_s == null ? "" : ", ETA " + Math.round(job.eta_s) + " s";
            var speed = job.steps_per_s ? ", " + job.steps_per_s.toFixed(2) + " it/s" : "";
            var loss = job.loss == null ? "" : ", loss " + job.loss.toFixed(5);
            var err = job.error ? '<div class="trainer-error">' + job.error.replace(/</g, "&lt;") + "</div>" : "";
            var status = job.status ? " (" + job.status.replace(/</g, "&lt;") + ")" : "";
            bar.innerHTML = '<div class="trainer-bar"><div style="width:' + pct + '%"></div></div>' +
                '<div class="trainer-text">' + job.state + status + ": step " + job.step + "/" + job.total_steps +
                loss + speed + eta + "</div>" + err;
        }
        trainerState.history = trainerState.history.concat(job.history);
        if (job.history.length) trainerState.since = job.history[job.history.length - 1].step;
        var canvas = trainerEl("trainer_loss_chart");
        if (canvas) trainerDrawChart(canvas, trainerState.history);
        var gallery = trainerEl("trainer_previews");
        if (gallery && job.previews.length > trainerState.previews) {
            for (var i = trainerState.previews; i < job.previews.length; i++) {
                var img = document.createElement("img");
                img.src = "./trainer/v1/jobs/" + job.id + "/previews/" + job.previews[i].index;
                img.title = "step " + job.previews[i].step;
                gallery.insertBefore(img, gallery.firstChild);
            }
            trainerState.previews = job.previews.length;
        }
    }

    // the WebUI's extra-networks panels list files when built; press their refresh so new files show up
    function trainerRefreshPanels(method) {
        var page = {lora: "lora", hypernetwork: "hypernetworks"}[method] || "textual_inversion";
        ["txt2img", "img2img"].forEach(function(tab) {
            var button = gradioApp().querySelector("#" + tab + "_" + page + "_extra_refresh");
            if (button) button.click();
        });
    }

    function trainerPoll() {
        var box = trainerJobIdBox();
        var id = box ? box.value : "";
        if (!id) return;
        if (id !== trainerState.jobId) {
            trainerState = {jobId: id, since: 0, history: [], previews: 0, timer: trainerState.timer};
            var gallery = trainerEl("trainer_previews");
            if (gallery) gallery.innerHTML = "";
        }
        if (trainerState.done) return;
        fetch("./trainer/v1/jobs/" + encodeURIComponent(id) + "?since=" + trainerState.since)
            .then(function(r) { return r.ok ? r.json() : null; })
            .then(function(job) {
                if (!job) return;
                trainerRender(job);
                trainerState.done = ["done", "failed", "interrupted", "cancelled"].indexOf(job.state) >= 0;
                if (trainerState.done && job.saved.length) trainerRefreshPanels(job.method);
            })
            .catch(function() {});
    }

    onUiLoaded(function() {
        if (!trainerState.timer) trainerState.timer = setInterval(trainerPoll, 1000);
    });
})();
