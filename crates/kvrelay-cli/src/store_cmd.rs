use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum StoreCommand {
    Ls,
}

pub fn run(_cmd: StoreCommand) -> Result<ExitCode, String> {
    Err("not built yet".into())
}
