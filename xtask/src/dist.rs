pub fn run(_: &std::path::Path) -> anyhow::Result<()> { todo!() }
pub fn deb(_: &std::path::Path, _: &std::path::Path, _: &std::path::Path) -> anyhow::Result<std::path::PathBuf> { todo!() }
