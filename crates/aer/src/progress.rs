//! Progress for long waits, on stderr only (stdout keeps the result alone), and only when
//! stderr is a terminal: bars per layer and a total for `aer image pull`, a spinner with
//! the elapsed time and the latest phase for the synchronous runs (`aer vm run`,
//! `aer instance spawn`, `aer pod run`). On a pipe callers print plain lines, or nothing.
//!
//! The runs' RPCs answer only once the workload is up, and auraed registers a VM, an
//! instance or a pod only then, so there is nothing to poll in between: the phase comes
//! from the Events stream, watched in parallel for the object's name (a pod's instance
//! announces itself before the pod does), and is the elapsed time alone until an event
//! arrives or where watching events is not granted.

use std::{
    collections::HashMap,
    future::Future,
    io::IsTerminal,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use indicatif::{BinaryBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::{Status, Streaming};

/// Whether progress may be drawn: stderr is a terminal.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

/// A layer's digest as the bars name it: its first 12 hex digits.
fn short(layer: &str) -> &str {
    let hex = layer.strip_prefix("sha256:").unwrap_or(layer);
    hex.get(..12).unwrap_or(hex)
}

/// `aer image pull` on a terminal: one bar per layer (bytes done / total, speed, ETA, its
/// phase) above a total line for the bytes downloaded so far. Layers already in the store
/// say `cached` and count in neither the total nor its speed.
#[derive(Debug)]
pub struct PullBars {
    multi: MultiProgress,
    total: ProgressBar,
    layers: HashMap<String, (ProgressBar, u64)>,
    order: Vec<String>,
    cached: usize,
    started: Instant,
}

const LAYER_BAR: &str = "{prefix}  {msg:<11} [{wide_bar}] {binary_bytes:>10} / {binary_total_bytes:<10} {binary_bytes_per_sec:>12}  ETA {eta}";
const LAYER_DONE: &str = "{prefix}  {msg}";
const TOTAL_BAR: &str = "total         [{wide_bar}] {binary_bytes:>10} / {binary_total_bytes:<10} {binary_bytes_per_sec:>12}  ETA {eta}  {msg}";

impl PullBars {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0).with_style(style(TOTAL_BAR)));
        Self {
            multi,
            total,
            layers: HashMap::new(),
            order: Vec::new(),
            cached: 0,
            started: Instant::now(),
        }
    }

    fn layer(&mut self, digest: &str, total: u64) -> &ProgressBar {
        if !self.layers.contains_key(digest) {
            let bar = ProgressBar::new(total)
                .with_style(style(LAYER_BAR))
                .with_prefix(short(digest).to_owned());
            let bar = self.multi.insert_before(&self.total, bar);
            self.order.push(digest.to_owned());
            self.layers.insert(digest.to_owned(), (bar, 0));
        }
        &self.layers[digest].0
    }

    /// Takes one progress message of the stream (not the last, which carries the image).
    pub fn update(&mut self, p: &pb::PullImageProgress) {
        let first = !self.layers.contains_key(&p.layer);
        let bar = self.layer(&p.layer, p.total_bytes).clone();
        match p.phase.as_str() {
            "cached" => {
                bar.set_length(p.total_bytes);
                bar.set_position(p.total_bytes);
                bar.set_style(style(LAYER_DONE));
                bar.finish_with_message(format!("cached      {}", BinaryBytes(p.total_bytes)));
                if first {
                    self.cached += 1;
                }
            }
            "downloading" => {
                if first {
                    if self.total.length() == Some(0) {
                        // Speed and ETA count from the first byte, not from the request.
                        self.total.reset_elapsed();
                        self.total.reset_eta();
                    }
                    self.total.inc_length(p.total_bytes);
                }
                bar.set_message("downloading");
                bar.set_length(p.total_bytes);
                let before = self.layers.get(&p.layer).map_or(0, |(_, d)| *d);
                bar.set_position(p.done_bytes);
                self.total.inc(p.done_bytes.saturating_sub(before));
                if let Some((_, d)) = self.layers.get_mut(&p.layer) {
                    *d = p.done_bytes.max(before);
                }
            }
            "unpacking" => bar.set_message("unpacking"),
            "done" => {
                if !bar.is_finished() {
                    bar.set_position(p.total_bytes);
                    bar.set_style(style(LAYER_DONE));
                    bar.finish_with_message(format!("done        {}", BinaryBytes(p.total_bytes)));
                }
            }
            other => bar.set_message(other.to_owned()),
        }
        self.total.set_message(self.counts());
    }

    fn counts(&self) -> String {
        let n = self.order.len();
        let mut s = format!("{n} layer{}", if n == 1 { "" } else { "s" });
        if self.cached > 0 {
            s.push_str(&format!(", {} cached", self.cached));
        }
        s
    }

    /// The pull ended with `info`: the total line says what was pulled, by digest.
    pub fn finish(&self, info: &pb::ImageInfo) {
        self.total.set_style(style("{msg}"));
        self.total.finish_with_message(format!(
            "pulled {} ({}, {} fetched in {:.1}s)  {}",
            info.reference,
            self.counts(),
            BinaryBytes(info.fetched_bytes),
            self.started.elapsed().as_secs_f64(),
            info.digest,
        ));
    }

    /// The pull failed: the bars stay as they were, the total line says so.
    pub fn fail(&self, e: &Status) {
        for (bar, _) in self.layers.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        self.total.set_style(style("{msg}"));
        self.total
            .abandon_with_message(format!("pull failed: {:?}: {}", e.code(), e.message()));
    }
}

/// A spinner on stderr: `⠋ what  12s  phase`.
#[derive(Debug)]
pub struct Spinner {
    bar: ProgressBar,
    started: Instant,
}

impl Spinner {
    pub fn start(what: &str, phase: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(style("{spinner} {prefix}  {elapsed:>4}  {wide_msg}"))
            .with_prefix(what.to_owned())
            .with_message(phase.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self {
            bar,
            started: Instant::now(),
        }
    }

    pub fn phase(&self, phase: String) {
        self.bar.set_message(phase);
    }

    fn end(&self, how: &str, ok: bool) {
        self.bar.set_style(style("{prefix}  {msg}"));
        let msg = format!("{how} after {:.1}s", self.started.elapsed().as_secs_f64());
        if ok {
            self.bar.finish_with_message(msg);
        } else {
            self.bar.abandon_with_message(msg);
        }
    }
}

/// What a spinner shows for an event about the object it waits for.
pub fn event_phase(e: &pb::Event) -> String {
    let kind = match pb::Kind::try_from(e.kind) {
        Ok(pb::Kind::VirtualMachine) => "vm",
        Ok(pb::Kind::Instance) => "instance",
        Ok(pb::Kind::Pod) => "pod",
        Ok(pb::Kind::Cell) => "cell",
        Ok(pb::Kind::Executable) => "executable",
        _ => "?",
    };
    let ty = pb::EventType::try_from(e.r#type).map_or_else(
        |_| "?".to_owned(),
        |t| {
            t.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_lowercase()
        },
    );
    // Control characters from auraed never reach the terminal.
    let msg = crate::output::printable(&e.message);
    if msg.is_empty() {
        format!("{kind} {ty}")
    } else {
        format!("{kind} {ty}: {msg}")
    }
}

/// The next event of a watch, or never when there is none.
async fn next_event(s: &mut Option<Streaming<pb::Event>>) -> Option<pb::Event> {
    match s {
        Some(s) => s.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// What to watch while a synchronous run is under way.
#[derive(Debug)]
pub struct Watch<'a> {
    /// Shown before the phase, e.g. `spawning instance web`.
    pub what: String,
    /// The phase until an event says more, e.g. `booting; waiting for its health`.
    pub first_phase: &'a str,
    /// The object's exact name, and the kinds of event about it to show.
    pub name: &'a str,
    pub kinds: Vec<pb::Kind>,
    /// Added to a phase of this kind's STARTED event: what happens next.
    pub then: Option<(pb::Kind, &'a str)>,
}

/// Awaits `call` (a synchronous run); on a terminal with a spinner on stderr that shows
/// the elapsed time and the latest event about `w.name`, watched in parallel.
pub async fn wait<T>(
    c: &Client,
    w: Watch<'_>,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    if !on_terminal() {
        return call.await;
    }
    let spinner = Spinner::start(&w.what, w.first_phase);
    let req = pb::WatchEventsRequest {
        kinds: w.kinds.iter().map(|k| *k as i32).collect(),
        name_prefix: w.name.to_owned(),
        after_sequence: 0,
    };
    let mut events = c.events();
    let watch = events.watch(req);
    tokio::pin!(call, watch);
    let mut stream: Option<Streaming<pb::Event>> = None;
    let mut watching = true;
    loop {
        tokio::select! {
            r = &mut call => {
                match &r {
                    Ok(_) => spinner.end("done", true),
                    Err(e) => spinner.end(&format!("failed ({:?})", e.code()), false),
                }
                return r;
            }
            // Not granted or not there: the spinner shows the elapsed time alone.
            s = &mut watch, if watching => {
                watching = false;
                stream = s.ok().map(tonic::Response::into_inner);
            }
            e = next_event(&mut stream), if stream.is_some() => match e {
                Some(e) if e.name == w.name => {
                    let mut phase = event_phase(&e);
                    if let Some((kind, next)) = w.then
                        && e.kind == kind as i32
                        && e.r#type == pb::EventType::Started as i32
                    {
                        phase = format!("{phase}; {next}");
                    }
                    spinner.phase(phase);
                }
                Some(_) => {}
                None => stream = None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_named_by_their_first_hex_digits() {
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short("sha256:01"), "01");
        assert_eq!(short("xyz"), "xyz");
    }

    #[test]
    fn events_read_as_phases_without_control_characters() {
        let e = pb::Event {
            kind: pb::Kind::Instance as i32,
            r#type: pb::EventType::Started as i32,
            name: "web".into(),
            message: "spiffe://t/instance/web at\x1b[2J 10.0.0.2:8443".into(),
            ..Default::default()
        };
        assert_eq!(
            event_phase(&e),
            "instance started: spiffe://t/instance/web at [2J 10.0.0.2:8443"
        );
        let e = pb::Event {
            kind: pb::Kind::VirtualMachine as i32,
            r#type: pb::EventType::Failed as i32,
            ..Default::default()
        };
        assert_eq!(event_phase(&e), "vm failed");
    }

    #[test]
    fn pull_bars_count_downloads_and_cached_layers_apart() {
        // Hidden (not a terminal under test), but the arithmetic is the same.
        let mut b = PullBars::new();
        let msg = |layer: &str, done, total, phase: &str| pb::PullImageProgress {
            layer: layer.into(),
            done_bytes: done,
            total_bytes: total,
            phase: phase.into(),
            image: None,
        };
        b.update(&msg("sha256:aa", 100, 100, "cached"));
        b.update(&msg("sha256:bb", 10, 50, "downloading"));
        b.update(&msg("sha256:bb", 50, 50, "downloading"));
        b.update(&msg("sha256:bb", 50, 50, "unpacking"));
        b.update(&msg("sha256:bb", 50, 50, "done"));
        b.update(&msg("sha256:cc", 5, 20, "downloading"));
        assert_eq!(
            b.total.length(),
            Some(70),
            "cached layers are not downloaded"
        );
        assert_eq!(b.total.position(), 55);
        assert_eq!(b.counts(), "3 layers, 1 cached");
        assert!(b.layers["sha256:bb"].0.is_finished());
        assert!(!b.layers["sha256:cc"].0.is_finished());
    }
}
