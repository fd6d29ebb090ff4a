#[derive(clap::Args)]
pub struct HashArgs {}

pub fn run(_args: HashArgs) -> Result<(), String> {
    Err("not built yet".into())
}
