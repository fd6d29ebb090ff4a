use std::process::ExitCode;

#[derive(clap::Args)]
pub struct KeysArgs {}

pub fn run(_args: KeysArgs) -> Result<ExitCode, String> {
    Err("not built yet".into())
}
