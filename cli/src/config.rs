//! `shoal get configs` and `shoal describe config NAME`: a config's keys and overrides, the
//! workloads that read it (and the version each runs), and which value every device gets,
//! with where it comes from.

use super::*;
use shoal_api::model::config::{Source, Target};
use shoal_api::wire::views::ConfigDescription;

pub(crate) fn configs_table(configs: &[ConfigView]) -> Table {
    let mut t = Table::new(&["NAME", "KEYS", "OVERRIDES", "VERSION", "USED BY"]);
    for c in configs {
        t.row(vec![
            c.name.clone(),
            c.keys.join(","),
            c.overrides.to_string(),
            c.version.clone(),
            if c.used_by.is_empty() {
                "-".into()
            } else {
                c.used_by.join(",")
            },
        ]);
    }
    t
}

fn source(s: Source) -> String {
    match s {
        Source::Data => "data".into(),
        Source::Override(i) => format!("overrides[{i}]"),
    }
}

pub(crate) async fn describe_config(hub: &Hub, name: &str, output: Output) -> anyhow::Result<()> {
    let d: ConfigDescription = hub.get(&format!("/v1/configs/{name}")).await?;
    if matches!(output, Output::Json | Output::Yaml) {
        return emit(&d, output, |_| Table::new(&[]));
    }
    println!("Name:        {}", d.config.name);
    println!("Version:     {}", d.version);
    println!("Keys:        {}", escaped(&d.config.keys().join(", ")));
    for (i, o) in d.config.overrides.iter().enumerate() {
        let target = match &o.target {
            Target::Device(id) => format!("device {id}"),
            Target::Selector(s) => format!("selector {s}"),
        };
        let keys: Vec<&str> = o.data.keys().map(String::as_str).collect();
        println!(
            "Override:    overrides[{i}] {} sets {}",
            escaped(&target),
            escaped(&keys.join(", "))
        );
    }
    if d.users.is_empty() {
        println!("Used by:     <none>");
    }
    for u in &d.users {
        let note = if u.version == d.version {
            String::new()
        } else {
            format!(
                " (its spec pins version {}, rolled back or still rolling out: `shoal rollout status`; apply the workload again to move it on)",
                u.version
            )
        };
        println!("Used by:     {}{note}", u.workload);
    }
    println!("Values by device:");
    let mut t = Table::new(&["DEVICE", "KEY", "VALUE", "FROM"]);
    for dev in &d.devices {
        for (k, v) in &dev.values {
            t.row(vec![
                dev.device.clone(),
                k.clone(),
                escaped(&v.value).into_owned(),
                source(v.from),
            ]);
        }
    }
    print!("{t}");
    Ok(())
}

/// `shoal policy get|set`.
pub(crate) async fn policy(
    hub: &Hub,
    action: PolicyCmd,
    allow: &[String],
    output: Output,
) -> anyhow::Result<()> {
    use shoal_api::policy::fleet::{FleetPolicy, Privilege};
    let policy: FleetPolicy = match action {
        PolicyCmd::Get => {
            if !allow.is_empty() {
                bail!("--allow goes with `policy set`");
            }
            hub.get("/v1/policy").await?
        }
        PolicyCmd::Set => {
            if allow.is_empty() {
                bail!("give --allow privileged,host-devices (or --allow none)");
            }
            let mut p = FleetPolicy::default();
            for a in allow.iter().filter(|a| a.as_str() != "none") {
                match a.parse::<Privilege>()? {
                    Privilege::Privileged => p.allow_privileged = true,
                    Privilege::HostDevices => p.allow_host_devices = true,
                }
            }
            hub.put_for("/v1/policy", &serde_json::to_value(p)?).await?
        }
    };
    emit(&policy, output, |_| {
        let mut t = Table::new(&["PRIVILEGE", "ALLOWED"]);
        for p in Privilege::ALL {
            t.row(vec![p.name().into(), policy.allows(p).to_string()]);
        }
        t
    })
}
