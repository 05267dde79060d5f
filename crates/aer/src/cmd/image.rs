//! `aer image …`: the Images service (pull with progress, list, remove).

use std::collections::HashMap;

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, images_client::ImagesClient};
use clap::Subcommand;
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::size;
use crate::output::{Format, Row, print};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Pull an image into auraed's store, with progress per layer.
    Pull { image: String },
    /// Images in the store.
    Ls,
    /// Forget an image reference.
    Rm { image: String },
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

/// Pulls, printing progress to stderr (tables only) and the pulled image at the end.
async fn pull(x: &mut ImagesClient<Channel>, image: String, fmt: Format) -> Result<(), Status> {
    let mut s = x.pull(pb::PullImageRequest { image }).await?.into_inner();
    let mut last_pct = HashMap::new();
    while let Some(p) = s.message().await? {
        if let Some(i) = p.image {
            let row = vec![
                ("reference", json!(i.reference)),
                ("digest", json!(i.digest)),
                ("layers", json!(i.layers)),
                ("fetched_bytes", json!(i.fetched_bytes)),
            ];
            print(fmt, &[row], true);
            continue;
        }
        // One line per layer and phase, and every 25 % while downloading.
        let pct = (p.done_bytes * 100)
            .checked_div(p.total_bytes)
            .unwrap_or(100)
            / 25;
        let key = (p.layer.clone(), p.phase.clone());
        if fmt == Format::Table && last_pct.insert(key, pct) != Some(pct) {
            let short = p.layer.get(7..19).unwrap_or(&p.layer);
            eprintln!(
                "{short}  {:<11} {:>10} / {}",
                p.phase,
                size(Some(p.done_bytes)),
                size(Some(p.total_bytes))
            );
        }
    }
    Ok(())
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
}
