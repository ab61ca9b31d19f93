//! `beacon-vmm`: run one VM from the command line (thin CLI over the library).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("beacon-vmm run is not wired yet")
}
