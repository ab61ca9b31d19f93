//! `beacon-initrd`: build (or list) a beacon initrd.

use std::path::PathBuf;

use anyhow::{bail, Context};
use beacon_initrd::{build, read, Compression, InitrdSpec};
use clap::Parser;

/// Pack an init, busybox, crun and the libraries they need into a reproducible cpio.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The program (or #! script) that becomes /init.
    #[arg(long, required_unless_present = "list")]
    init: Option<PathBuf>,
    /// busybox to include as /bin/busybox (+ /bin/sh), for debugging.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// crun to include as /usr/bin/crun.
    #[arg(long)]
    crun: Option<PathBuf>,
    /// Extra file as SRC=/DEST (repeatable); ELF files bring their libraries.
    #[arg(long = "add", value_name = "SRC=/DEST")]
    add: Vec<String>,
    /// Pack ELF files with their symbols and debug sections (for debugging in the
    /// guest); by default they are stripped (the source files are never changed).
    #[arg(long)]
    keep_symbols: bool,
    /// Compression of the archive.
    #[arg(long, value_enum, default_value_t = Compression::Gzip)]
    compress: Compression,
    /// Where to write the initrd.
    #[arg(long, short, required_unless_present = "list")]
    output: Option<PathBuf>,
    /// List the members of an existing initrd instead of building one.
    #[arg(long, value_name = "INITRD", conflicts_with = "init")]
    list: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(path) = cli.list {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path:?}"))?;
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for e in read(file).with_context(|| format!("reading {path:?}"))? {
            // A closed pipe (`| head`) ends the listing quietly.
            if writeln!(out, "{:06o} {:>9} {}", e.mode, e.data.len(), e.path).is_err() {
                break;
            }
        }
        return Ok(());
    }
    let (Some(init), Some(output)) = (cli.init, cli.output) else {
        bail!("--init and --output are required to build an initrd");
    };
    let mut extra = Vec::new();
    for spec in cli.add {
        let Some((src, dest)) = spec.split_once('=') else {
            bail!("--add {spec:?}: expected SRC=/DEST");
        };
        extra.push((PathBuf::from(src), dest.to_string()));
    }
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"))?,
        Err(_) => 0,
    };
    let spec = InitrdSpec {
        init,
        busybox: cli.busybox,
        crun: cli.crun,
        extra,
        compression: cli.compress,
        mtime,
        keep_symbols: cli.keep_symbols,
    };
    let tmp = output.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {tmp:?}"))?;
    build(&spec, &mut file).context("building the initrd")?;
    file.sync_all()?;
    std::fs::rename(&tmp, &output).with_context(|| format!("renaming to {output:?}"))?;
    Ok(())
}
