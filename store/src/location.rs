//! Where a store lives: an `s3://BUCKET/PREFIX` location, and the endpoint, region and
//! credentials to reach it.
//!
//! The endpoint comes from `--endpoint` or `AWS_ENDPOINT_URL`, the region from
//! `AWS_REGION` (S3-compatible stores such as SeaweedFS or MinIO accept any), and the
//! credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or, failing those, a
//! config file (`SNAPVMM_STORE_CONFIG`, else `~/.aws/credentials`) in the AWS INI format.
//! Credentials are held in a type whose `Debug` prints nothing of them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest config file read (the AWS INI format is a few lines).
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// A bucket and a key prefix in it: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The bucket.
    pub bucket: String,
    /// The key prefix every object of the store lives under ("" for the bucket's root),
    /// without leading or trailing slashes.
    pub prefix: String,
}

impl Location {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("store location '{url}': {why}"));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || bucket.len() > 63 {
            return Err(bad("the bucket name must be 1 to 63 characters"));
        }
        if !bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(bad(
                "the bucket name may hold lowercase letters, digits, '-' and '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            check_key_part(part).map_err(|why| bad(&why))?;
        }
        if prefix.split('/').any(str::is_empty) && !prefix.is_empty() {
            return Err(bad("empty path component in the prefix"));
        }
        Ok(Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Splits `s3://BUCKET/PREFIX/NAME` into the store's location and the snapshot name
    /// (the last component).
    pub fn parse_snapshot(url: &str) -> Result<(Self, String)> {
        let trimmed = url.trim_end_matches('/');
        let (store, name) = trimmed.rsplit_once('/').ok_or_else(|| {
            Error::InvalidArgument(format!(
                "snapshot location '{url}': expected s3://BUCKET/PREFIX/NAME"
            ))
        })?;
        if store == "s3:/" || store == "s3:" {
            return Err(Error::InvalidArgument(format!(
                "snapshot location '{url}': expected s3://BUCKET/PREFIX/NAME"
            )));
        }
        check_snapshot_name(name)?;
        Ok((Location::parse(store)?, name.to_string()))
    }

    /// The key of `relative` under the prefix.
    pub fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

fn check_key_part(part: &str) -> std::result::Result<(), String> {
    if part == "." || part == ".." {
        return Err(format!("'{part}' is not allowed in a key"));
    }
    if !part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'='))
    {
        return Err(format!(
            "'{part}': key components may hold letters, digits and - _ . + ="
        ));
    }
    Ok(())
}

/// Checks a snapshot name is usable as an object key component (and as a tree name).
pub fn check_snapshot_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 {
        return Err(Error::InvalidArgument(format!(
            "snapshot name '{name}': 1 to 200 characters"
        )));
    }
    check_key_part(name)
        .map_err(|why| Error::InvalidArgument(format!("snapshot name '{name}': {why}")))
}

/// A secret kept out of every `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the client builder only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How to reach the object store: endpoint, region and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The S3 endpoint URL (`http://127.0.0.1:8333`); `None` for AWS's own.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// The access key id (not secret by itself, but kept out of messages all the same).
    pub access_key_id: Option<Secret>,
    /// The secret access key.
    pub secret_access_key: Option<Secret>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

impl StoreConfig {
    /// The configuration from the environment (and the config file it names, or
    /// `~/.aws/credentials`), with `endpoint` (from `--endpoint`) taking precedence.
    pub fn from_env(endpoint: Option<&str>) -> Result<Self> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let file = match vars.get("SNAPVMM_STORE_CONFIG") {
            Some(path) => Some(PathBuf::from(path)),
            None => vars
                .get("HOME")
                .map(|home| Path::new(home).join(".aws/credentials"))
                .filter(|p| p.exists()),
        };
        let file_values = match file {
            Some(path) => {
                let profile = vars.get("AWS_PROFILE").map(String::as_str);
                read_config_file(&path, profile.unwrap_or("default"))?
            }
            None => HashMap::new(),
        };
        Self::resolve(endpoint, &vars, &file_values)
    }

    /// Combines the sources: `--endpoint`, then environment variables, then the file.
    fn resolve(
        endpoint: Option<&str>,
        env: &HashMap<String, String>,
        file: &HashMap<String, String>,
    ) -> Result<Self> {
        let pick = |env_name: &str, file_name: &str| {
            env.get(env_name)
                .filter(|v| !v.is_empty())
                .or_else(|| file.get(file_name))
                .cloned()
        };
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| pick("AWS_ENDPOINT_URL", "endpoint_url"));
        if let Some(url) = &endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "endpoint '{url}': expected http:// or https://"
                )));
            }
        }
        let region = pick("AWS_REGION", "region")
            .or_else(|| env.get("AWS_DEFAULT_REGION").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let access_key_id = pick("AWS_ACCESS_KEY_ID", "aws_access_key_id").map(Secret);
        let secret_access_key = pick("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key").map(Secret);
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(Error::Config(
                "an access key id without a secret access key, or the other way round".into(),
            ));
        }
        Ok(StoreConfig {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
        })
    }
}

/// Reads `profile`'s `key = value` pairs from an AWS-style INI file.
fn read_config_file(path: &Path, profile: &str) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok(parse_ini(&text, profile))
}

fn parse_ini(text: &str, profile: &str) -> HashMap<String, String> {
    let mut values = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            section = name.strip_prefix("profile ").unwrap_or(name).to_string();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            values.insert(key.trim().to_string(), value.trim().to_string());
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_are_refused() {
        let l = Location::parse("s3://snaps/fleet/a").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("snaps", "fleet/a"));
        assert_eq!(l.key("chunks/ab"), "fleet/a/chunks/ab");
        assert_eq!(l.to_string(), "s3://snaps/fleet/a");
        let root = Location::parse("s3://snaps").unwrap();
        assert_eq!(root.key("x"), "x");
        for bad in [
            "snaps/x",
            "s3://",
            "s3://UPPER/x",
            "s3://b/../x",
            "s3://b/a//c",
            "s3://b/a b",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
        let (store, name) = Location::parse_snapshot("s3://snaps/fleet/s1").unwrap();
        assert_eq!((store.prefix.as_str(), name.as_str()), ("fleet", "s1"));
        assert!(Location::parse_snapshot("s3://snaps").is_err());
        assert!(Location::parse_snapshot("s3://snaps/..").is_err());
    }

    #[test]
    fn config_prefers_flag_then_environment_then_file_and_hides_secrets() {
        let env: HashMap<String, String> = [
            ("AWS_ACCESS_KEY_ID", "envkey"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let file = parse_ini(
            "[other]\nregion = x\n[default]\nregion = eu-1\nendpoint_url = http://h:1\n\
             aws_access_key_id = filekey\naws_secret_access_key = filesecret\n",
            "default",
        );
        let config = StoreConfig::resolve(None, &env, &file).unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://h:1"));
        assert_eq!(config.region, "eu-1");
        assert_eq!(
            config.secret_access_key.as_ref().unwrap().expose(),
            "envsecret"
        );
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("envsecret") && !printed.contains("envkey"),
            "{printed}"
        );
        let flagged = StoreConfig::resolve(Some("http://flag:2"), &env, &file).unwrap();
        assert_eq!(flagged.endpoint.as_deref(), Some("http://flag:2"));
        let from_file = StoreConfig::resolve(None, &HashMap::new(), &file).unwrap();
        assert_eq!(from_file.access_key_id.unwrap().expose(), "filekey");
        assert!(StoreConfig::resolve(Some("ftp://x"), &env, &file).is_err());
        let half: HashMap<String, String> =
            [("AWS_ACCESS_KEY_ID".to_string(), "k".to_string())].into();
        assert!(StoreConfig::resolve(None, &half, &HashMap::new()).is_err());
    }
}
