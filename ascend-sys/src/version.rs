//! CANN versions, read at run time (never at build time): from the runtime's own
//! `aclsysGetVersionStr` / `aclsysGetVersionNum`, or, where those calls are missing or
//! fail, from the install tree's `share/info/<pkg>/version.info` and
//! `<arch>-linux/ascend_toolkit_install.info`.

use std::fmt;
use std::path::{Path, PathBuf};

/// A CANN package version, ordered as CANN orders them: its `aclsysGetVersionNum` number,
/// `major·10^7 + minor·10^5 + patch·10^3`, less 300/200/100 for alpha/beta/RC builds plus
/// their number (so 9.1.0-beta.1 < 9.1.0).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CannVersion(i32);

/// A version taken apart: major, minor, patch, and the pre-release kind and number.
type Parts = (i32, i32, i32, Option<(Pre, i32)>);

/// A pre-release kind, with its offset below the release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    Alpha,
    Beta,
    Rc,
}

impl Pre {
    const ALL: [Pre; 3] = [Pre::Alpha, Pre::Beta, Pre::Rc];

    fn offset(self) -> i32 {
        match self {
            Pre::Alpha => 300,
            Pre::Beta => 200,
            Pre::Rc => 100,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Pre::Alpha => "alpha",
            Pre::Beta => "beta",
            Pre::Rc => "rc",
        }
    }
}

impl CannVersion {
    /// The release `major.minor.patch`.
    pub const fn release(major: u8, minor: u8, patch: u8) -> Self {
        CannVersion(major as i32 * 10_000_000 + minor as i32 * 100_000 + patch as i32 * 1_000)
    }

    /// The version `aclsysGetVersionNum` encodes as `num`; `None` for a number that cannot
    /// be one (zero, negative, or a pre-release offset out of range).
    pub fn from_num(num: i32) -> Option<Self> {
        let version = CannVersion(num);
        (num > 0 && version.parts().is_some()).then_some(version)
    }

    /// The number `aclsysGetVersionNum` reports for this version.
    pub fn num(self) -> i32 {
        self.0
    }

    /// Parses the forms CANN writes: `8.5.0`, `8.0.RC3`, `9.1.0-beta.1`, `8.5.0.alpha001`,
    /// `8.5` (patch 0).
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let mut numbers = Vec::new();
        let mut pre = None;
        let mut tokens = lower.split(['.', '-']).peekable();
        while let Some(token) = tokens.next() {
            if let Ok(n) = token.parse::<u8>() {
                if pre.is_some() || numbers.len() == 3 {
                    return None;
                }
                numbers.push(n);
                continue;
            }
            let kind = Pre::ALL.into_iter().find(|p| token.starts_with(p.word()))?;
            let rest = &token[kind.word().len()..];
            let n: i32 = if rest.is_empty() {
                tokens.next().and_then(|t| t.parse().ok()).unwrap_or(0)
            } else {
                rest.parse().ok()?
            };
            // Each kind numbers its builds below 100, so they never reach the next kind.
            if pre.is_some() || !(0..100).contains(&n) {
                return None;
            }
            pre = Some((kind, n));
        }
        let [major, minor, patch] = match numbers[..] {
            [major, minor] => [major, minor, 0],
            [major, minor, patch] => [major, minor, patch],
            _ => return None,
        };
        if major > 99 || minor > 99 || patch > 99 {
            return None;
        }
        let release = Self::release(major, minor, patch).0;
        Some(CannVersion(match pre {
            None => release,
            Some((kind, n)) => release - kind.offset() + n,
        }))
    }

    /// (major, minor, patch, pre-release), or `None` for an impossible number.
    fn parts(self) -> Option<Parts> {
        let below = (1000 - self.0.rem_euclid(1000)) % 1000;
        let release = self.0 + below;
        let pre = match below {
            0 => None,
            1..=100 => Some((Pre::Rc, 100 - below)),
            101..=200 => Some((Pre::Beta, 200 - below)),
            _ => Some((Pre::Alpha, 300 - below)),
        };
        if below > 300 {
            return None;
        }
        Some((
            release / 10_000_000,
            release / 100_000 % 100,
            release / 1_000 % 100,
            pre,
        ))
    }

    /// (major, minor) of the release.
    pub fn major_minor(self) -> (i32, i32) {
        self.parts()
            .map_or((0, 0), |(major, minor, ..)| (major, minor))
    }
}

impl fmt::Display for CannVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            None => write!(f, "<invalid CANN version number {}>", self.0),
            Some((major, minor, patch, None)) => write!(f, "{major}.{minor}.{patch}"),
            Some((major, minor, 0, Some((Pre::Rc, n)))) => write!(f, "{major}.{minor}.RC{n}"),
            Some((major, minor, patch, Some((kind, n)))) => {
                write!(f, "{major}.{minor}.{patch}-{}.{n}", kind.word())
            }
        }
    }
}

impl fmt::Debug for CannVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CannVersion({self})")
    }
}

/// Where a version was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSource {
    /// `aclsysGetVersionStr(<pkg>)`.
    VersionStr,
    /// `aclsysGetVersionNum(<pkg>)` (the string form was missing or unparsable).
    VersionNum,
    /// A version file of the install tree.
    File(PathBuf),
}

impl fmt::Display for VersionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSource::VersionStr => f.write_str("aclsysGetVersionStr"),
            VersionSource::VersionNum => f.write_str("aclsysGetVersionNum"),
            VersionSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A package version and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundVersion {
    /// The version.
    pub version: CannVersion,
    /// The text as the source wrote it.
    pub text: String,
    /// Where it was read.
    pub source: VersionSource,
}

impl fmt::Display for FoundVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {})", self.version, self.source)
    }
}

/// The value of the first `version=` line (any case of `version`) of a CANN info file.
pub fn parse_info_file(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("version")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// The version files of package `pkg` under an install root, in the order they are read:
/// `share/info/<pkg>/version.info`, then (for the toolkit as a whole)
/// `<arch>-linux/ascend_toolkit_install.info`.
pub fn version_files(root: &Path, pkg: &str) -> Vec<PathBuf> {
    let arch = format!("{}-linux", std::env::consts::ARCH);
    vec![
        root.join("share/info").join(pkg).join("version.info"),
        root.join(arch).join("ascend_toolkit_install.info"),
    ]
}

/// The first readable, parsable version among `files`.
pub fn read_version_files(files: &[PathBuf]) -> Option<FoundVersion> {
    files.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        let value = parse_info_file(&text)?;
        Some(FoundVersion {
            version: CannVersion::parse(value)?,
            text: value.to_string(),
            source: VersionSource::File(path.clone()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_order_and_round_trip_through_their_numbers() {
        let v = |t: &str| CannVersion::parse(t).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(v("8.5.0"), CannVersion::release(8, 5, 0));
        assert_eq!(v("8.5.0").num(), 80_500_000);
        assert_eq!(v("8.5"), CannVersion::release(8, 5, 0));
        assert_eq!(v("9.1.0-beta.1").num(), 90_100_000 - 200 + 1);
        assert_eq!(v("8.0.RC3").num(), 80_000_000 - 100 + 3);
        assert_eq!(v("8.5.0.alpha001").num(), 80_500_000 - 300 + 1);
        assert!(v("9.1.0-beta.1") < v("9.1.0"));
        assert!(v("8.0.RC3") < v("8.0.0"));
        assert!(v("8.3.0") < v("8.5.0") && v("8.5.0") < v("9.0.0"));
        for text in [
            "8.5.0",
            "8.0.RC3",
            "9.1.0-beta.1",
            "8.5.0-alpha.1",
            "10.0.2",
        ] {
            let version = v(text);
            assert_eq!(CannVersion::from_num(version.num()), Some(version));
            assert_eq!(v(&version.to_string()), version, "{text} -> {version}");
        }
        assert_eq!(v("8.0.RC3").to_string(), "8.0.RC3");
        assert_eq!(v("9.1.0-beta.1").to_string(), "9.1.0-beta.1");
        for bad in [
            "",
            "8",
            "x.y.z",
            "8.5.0.1",
            "8.5.0-gamma.1",
            "8.5.0-rc.100",
            "300.1.0",
        ] {
            assert_eq!(CannVersion::parse(bad), None, "{bad:?}");
        }
        assert_eq!(CannVersion::from_num(0), None);
        assert_eq!(CannVersion::from_num(80_499_600), None);
    }

    #[test]
    fn info_files_give_their_version_line() {
        assert_eq!(
            parse_info_file("package_name=runtime\nVersion=8.5.0\n"),
            Some("8.5.0")
        );
        assert_eq!(
            parse_info_file("version=\"9.1.0-beta.1\"\narch=x86_64"),
            Some("9.1.0-beta.1")
        );
        assert_eq!(parse_info_file("name=x"), None);
        let dir = tempfile::tempdir().unwrap();
        let files = version_files(dir.path(), "runtime");
        assert_eq!(read_version_files(&files), None);
        let toolkit = &files[1];
        std::fs::create_dir_all(toolkit.parent().unwrap()).unwrap();
        std::fs::write(toolkit, "version=8.3.0\n").unwrap();
        let found = read_version_files(&files).unwrap();
        assert_eq!(found.version, CannVersion::release(8, 3, 0));
        assert_eq!(found.source, VersionSource::File(toolkit.clone()));
        // The package's own file comes first.
        std::fs::create_dir_all(files[0].parent().unwrap()).unwrap();
        std::fs::write(&files[0], "Version=8.5.0\n").unwrap();
        assert_eq!(
            read_version_files(&files).unwrap().version,
            CannVersion::release(8, 5, 0)
        );
    }
}
