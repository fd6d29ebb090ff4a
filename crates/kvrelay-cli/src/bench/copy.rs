#[derive(clap::Args)]
pub struct CopyArgs {}

pub fn run(_args: CopyArgs) -> Result<(), String> {
    Err("not built yet".into())
}
