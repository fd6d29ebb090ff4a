#[derive(clap::Args)]
pub struct StoreArgs {}

pub fn run(_args: StoreArgs) -> Result<(), String> {
    Err("not built yet".into())
}
