//! `aer image …`: the Images service (pull with progress, list, remove).

use std::collections::HashMap;

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, images_client::ImagesClient};
use clap::Subcommand;
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::size;
use crate::{
    output::{Format, Row, print},
    progress::{self, PullBars},
};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Pull an image into auraed's store: on a terminal with a progress bar per layer and
    /// a total on stderr, on a pipe one line per layer event; the image (its digest) on
    /// stdout.
    Pull {
        /// The image, by tag or digest, e.g. 127.0.0.1:5000/aurae/busybox:latest or
        /// registry.local/app@sha256:HEX.
        image: String,
    },
    /// Images in the store.
    Ls,
    /// Forget an image reference (layers other images share stay).
    Rm {
        /// A reference as `aer image ls` shows it, e.g. 127.0.0.1:5000/aurae/busybox:latest.
        image: String,
    },
}

pub async fn run(c: &Client, cmd: ImageCmd, fmt: Format) -> Result<(), Status> {
    let mut x = c.images();
    match cmd {
        ImageCmd::Pull { image } => pull(&mut x, image, fmt).await?,
        ImageCmd::Ls => {
            let l = x.list(pb::ListImagesRequest {}).await?.into_inner();
            let rows: Vec<Row> = l
                .images
                .iter()
                .map(|i| {
                    vec![
                        ("reference", json!(i.reference)),
                        ("digest", json!(i.digest)),
                        ("layers", json!(i.layers)),
                        ("size", json!(size(Some(i.size_bytes)))),
                    ]
                })
                .collect();
            print(fmt, &rows, false);
        }
        ImageCmd::Rm { image } => {
            let r = x.remove(pb::RemoveImageRequest { image }).await?;
            println!("removed {}", r.into_inner().reference);
        }
    }
    Ok(())
}

/// Pulls, showing progress on stderr (bars on a terminal, else one line per layer event
/// for tables) and the pulled image on stdout at the end.
async fn pull(x: &mut ImagesClient<Channel>, image: String, fmt: Format) -> Result<(), Status> {
    let mut bars = progress::on_terminal().then(PullBars::new);
    let result = pull_stream(x, image, fmt, bars.as_mut()).await;
    if let (Some(b), Err(e)) = (&bars, &result) {
        b.fail(e);
    }
    let info = result?;
    if let Some(b) = &bars {
        b.finish(&info);
    }
    let row = vec![
        ("reference", json!(info.reference)),
        ("digest", json!(info.digest)),
        ("layers", json!(info.layers)),
        ("fetched_bytes", json!(info.fetched_bytes)),
    ];
    print(fmt, &[row], true);
    Ok(())
}

/// Follows a pull to its end: the image pulled, or the error.
async fn pull_stream(
    x: &mut ImagesClient<Channel>,
    image: String,
    fmt: Format,
    mut bars: Option<&mut PullBars>,
) -> Result<pb::ImageInfo, Status> {
    let mut s = x.pull(pb::PullImageRequest { image }).await?.into_inner();
    let mut last_pct = HashMap::new();
    while let Some(p) = s.message().await? {
        if let Some(i) = p.image {
            return Ok(i);
        }
        match bars.as_deref_mut() {
            Some(b) => b.update(&p),
            None if fmt == Format::Table => {
                if let Some(line) = layer_line(&mut last_pct, &p) {
                    eprintln!("{line}");
                }
            }
            None => {}
        }
    }
    Err(Status::unknown(
        "the pull ended without saying what it pulled",
    ))
}

/// On a pipe: one line per layer and phase, and every 25 % while downloading.
fn layer_line(
    last_pct: &mut HashMap<(String, String), u64>,
    p: &pb::PullImageProgress,
) -> Option<String> {
    let pct = (p.done_bytes * 100)
        .checked_div(p.total_bytes)
        .unwrap_or(100)
        / 25;
    let key = (p.layer.clone(), p.phase.clone());
    if last_pct.insert(key, pct) == Some(pct) {
        return None;
    }
    let short = p.layer.get(7..19).unwrap_or(&p.layer);
    Some(format!(
        "{short}  {:<11} {:>10} / {}",
        p.phase,
        size(Some(p.done_bytes)),
        size(Some(p.total_bytes))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn image_verbs_parse() {
        assert!(matches!(
            parse("image pull 127.0.0.1:5000/aurae/busybox:latest").unwrap(),
            Command::Image(ImageCmd::Pull { image }) if image == "127.0.0.1:5000/aurae/busybox:latest"
        ));
        assert!(matches!(
            parse("image ls").unwrap(),
            Command::Image(ImageCmd::Ls)
        ));
        assert!(matches!(
            parse("-o json image rm x").unwrap(),
            Command::Image(ImageCmd::Rm { image }) if image == "x"
        ));
        assert!(parse("image pull").is_err());
    }

    #[test]
    fn piped_progress_is_one_line_per_layer_phase_and_quarter() {
        let mut seen = HashMap::new();
        let p = |done, phase: &str| pb::PullImageProgress {
            layer: "sha256:0123456789abcdef0123".into(),
            done_bytes: done,
            total_bytes: 4096,
            phase: phase.into(),
            image: None,
        };
        let lines: Vec<String> = [
            p(100, "downloading"),
            p(200, "downloading"),
            p(1100, "downloading"),
            p(4096, "downloading"),
            p(4096, "unpacking"),
            p(4096, "done"),
        ]
        .iter()
        .filter_map(|m| layer_line(&mut seen, m))
        .collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(
            lines[0].starts_with("0123456789ab  downloading"),
            "{lines:?}"
        );
        assert!(lines[2].ends_with("4.0K / 4.0K"), "{lines:?}");
        assert!(lines.iter().all(|l| !l.contains('\x1b')));
    }
}
