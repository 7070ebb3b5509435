//! The OCI runtime spec of a container ([`runtime_spec`], pure): image config merged with
//! the manifest, cgroup limits, read-only root, bind mounts, host network, device
//! allow-list and seccomp; and the user it runs as ([`image_user`]), resolved in the
//! image's own `/etc/passwd` and `/etc/group`.

use super::user::{self, ProcessUser, UserSpec};
use super::{rootfs, seccomp, ContainerRun, ContainerdError, ImageConfig, PreparedImage};
use std::path::PathBuf;

/// Why no runtime spec could be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("nothing to run: the image has no entrypoint or command, and the manifest gives none")]
    NothingToRun,
    /// The desired state asks for a capability no container may have (the hub refuses such
    /// a manifest; this is the device's own check).
    #[error("capabilities {0:?} are not allowed in a container")]
    Capabilities(Vec<String>),
    /// The desired state asks for what this device does not allow (the hub places such a
    /// container only where it is allowed; this is the device's own check).
    #[error("{} containers are not allowed on this device (shoal-agent run --allow {})", .0, .0)]
    NotAllowed(shoal_api::policy::fleet::Privilege),
    #[error(transparent)]
    Oci(#[from] oci_spec::OciSpecError),
}

/// Builds the OCI runtime spec for `run` of `image`: argv from the command/args or the image,
/// environment from the image then the manifest, `user` (the image's `USER`, resolved), the
/// memory limit and CPU quota as cgroup limits, a read-only root unless asked otherwise,
/// volumes as bind mounts, the host network (ports behave like the WASM variant's: on the
/// device's addresses), containerd's usual device allow-list and its default seccomp
/// profile for `host`.
pub fn runtime_spec(
    image: &ImageConfig,
    run: &ContainerRun,
    namespace: &str,
    user: &ProcessUser,
    host: &seccomp::Host,
) -> Result<oci_spec::runtime::Spec, SpecError> {
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
        LinuxNamespaceType, LinuxResourcesBuilder,
    };
    let entrypoint = if run.command.is_empty() {
        image.entrypoint.clone()
    } else {
        run.command.clone()
    };
    let cmd = if run.args.is_empty() && run.command.is_empty() {
        image.cmd.clone()
    } else {
        run.args.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(SpecError::NothingToRun);
    }
    use shoal_api::policy::fleet::Privilege;
    for (wants, p) in [
        (run.privileged, Privilege::Privileged),
        (!run.host_devices.is_empty(), Privilege::HostDevices),
    ] {
        if wants && !run.allow.contains(&p) {
            return Err(SpecError::NotAllowed(p));
        }
    }
    // The nodes given by class, then those given by path, with their cgroup access.
    let nodes: Vec<(&crate::hardware::NodeInfo, &str)> = run
        .devices
        .iter()
        .map(|n| (n, "rw"))
        .chain(run.host_devices.iter().map(|(n, a)| (n, a.as_str())))
        .collect();
    let mut env: Vec<String> = image.env.clone();
    for (k, v) in &run.env {
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_hostname(Some(run.id.clone()));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(argv));
    process.set_env(Some(env));
    process.set_terminal(Some(false));
    if !image.working_dir.is_empty() {
        process.set_cwd(PathBuf::from(&image.working_dir));
    }
    let mut who = process.user().clone();
    who.set_uid(user.uid);
    who.set_gid(user.gid);
    // `supplementalGroups`, and for a non-root process the group of each hardware node it
    // holds (`dialout` for a serial port), as `--group-add` would, so a 0660 node opens.
    let mut gids = user.additional_gids.clone();
    for g in &run.groups {
        if !gids.contains(g) {
            gids.push(*g);
        }
    }
    if user.uid != 0 {
        for (n, _) in &nodes {
            if !gids.contains(&n.gid) {
                gids.push(n.gid);
            }
        }
    }
    who.set_additional_gids((!gids.is_empty()).then_some(gids));
    process.set_user(who);
    // containerd's defaults, less `drop`, plus `add` (checked again here: only those that
    // stay inside the container), in every set a process starts with.
    let names = if run.privileged {
        // Privileged: every capability the agent holds (runc cannot give more).
        shoal_api::model::caps::held(host.cap_bounding)
            .iter()
            .map(|c| format!("CAP_{c}"))
            .collect()
    } else {
        shoal_api::model::caps::effective(&run.cap_add, &run.cap_drop)
            .ok_or_else(|| SpecError::Capabilities(run.cap_add.clone()))?
    };
    // By their serde names (`CAP_NET_RAW`), which is how the runtime spec spells them.
    let wanted: oci_spec::runtime::Capabilities = names
        .iter()
        .filter_map(|n| {
            serde_json::from_value::<oci_spec::runtime::Capability>(serde_json::Value::from(
                n.as_str(),
            ))
            .ok()
        })
        .collect();
    // A privileged container gets every capability this build of the spec knows.
    if wanted.len() != names.len() && !run.privileged {
        return Err(SpecError::Capabilities(names));
    }
    let mut caps = process.capabilities().clone().unwrap_or_default();
    // Bounding, permitted, effective: all of them. Inheritable and ambient (what a non-root
    // process keeps) only the defaults not dropped, as before: an added capability does not
    // reach a non-root `USER`, as in Kubernetes.
    let defaults: oci_spec::runtime::Capabilities = wanted
        .iter()
        .filter(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .is_some_and(|n| {
                    shoal_api::model::caps::DEFAULT
                        .iter()
                        .any(|d| n == format!("CAP_{d}"))
                })
        })
        .copied()
        .collect();
    caps.set_bounding(Some(wanted.clone()));
    caps.set_effective(Some(wanted.clone()));
    caps.set_permitted(Some(wanted.clone()));
    caps.set_inheritable(Some(defaults.clone()));
    caps.set_ambient(Some(defaults));
    process.set_capabilities(Some(caps));
    let bounding = wanted;
    spec.set_process(Some(process));
    if let Some(root) = spec.root().clone() {
        let mut root = root;
        root.set_readonly(Some(run.read_only_root));
        spec.set_root(Some(root));
    }
    // Volumes: read-write bind mounts (writable under a read-only root; runc creates the
    // mount point before it makes the root read-only); secrets: read-only ones. Private
    // propagation: nothing mounted inside leaks back to the device; no set-uid programs or
    // device files from them.
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &run.mounts {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(PathBuf::from(&m.guest))
                .typ("bind")
                .source(m.host.clone())
                .options(vec![
                    "rbind".into(),
                    "rprivate".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    if m.read_only { "ro" } else { "rw" }.into(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(format!("/{namespace}/{}", run.id))));
    // Host network: no network namespace.
    if let Some(ns) = linux.namespaces().clone() {
        linux.set_namespaces(Some(
            ns.into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect(),
        ));
    }
    let memory = i64::try_from(run.memory_limit).unwrap_or(i64::MAX);
    let mut resources = LinuxResourcesBuilder::default().memory(
        LinuxMemoryBuilder::default()
            .limit(memory)
            .swap(memory)
            .build()?,
    );
    if let Some(m) = run.cpu_millis {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(m) * 100)
                .period(100_000u64)
                .build()?,
        );
    }
    // Deny every device, then allow the ones every container needs (null, zero, full,
    // random, urandom, tty, console, ptmx, pts), as containerd's own default spec does.
    let mut devices = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    for (major, minor) in [
        (1, Some(3)),
        (1, Some(5)),
        (1, Some(7)),
        (1, Some(8)),
        (1, Some(9)),
        (5, Some(0)),
        (5, Some(1)),
        (5, Some(2)),
        (136, None),
    ] {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm");
        if let Some(minor) = minor {
            b = b.minor(minor);
        }
        devices.push(b.build()?);
    }
    // The hardware nodes the replica holds: the device's own node bind-mounted at the path
    // the agent's config names (not made anew with mknod, which a pseudo-terminal's slave
    // refuses to be opened through, and which would copy a node that may be replugged), and
    // allowed by the cgroup. Without `nodev`, unlike every other mount.
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if run.privileged {
        // Every device node: the device's /dev in place of the container's own (its
        // /dev/pts, /dev/shm and /dev/mqueue still mount on top), and no cgroup rule.
        devices = vec![LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build()?];
        for m in mounts.iter_mut() {
            if m.destination() == std::path::Path::new("/dev") {
                *m = oci_spec::runtime::MountBuilder::default()
                    .destination("/dev")
                    .typ("bind")
                    .source("/dev")
                    .options(vec!["rbind".into(), "rprivate".into(), "nosuid".into()])
                    .build()?;
            }
            if m.destination() == std::path::Path::new("/sys") {
                let opts = m.options().clone().unwrap_or_default();
                m.set_options(Some(opts.into_iter().filter(|o| o != "ro").collect()));
            }
        }
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    }
    for (n, access) in nodes {
        let typ = if n.block {
            LinuxDeviceType::B
        } else {
            LinuxDeviceType::C
        };
        let (major, minor) = (
            i64::try_from(n.major).unwrap_or(i64::MAX),
            i64::try_from(n.minor).unwrap_or(i64::MAX),
        );
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(n.path.clone())
                .typ("bind")
                .source(n.source.clone())
                .options(vec![
                    "bind".into(),
                    "rprivate".into(),
                    "nosuid".into(),
                    "noexec".into(),
                    "rw".into(),
                ])
                .build()?,
        );
        devices.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(typ)
                .major(major)
                .minor(minor)
                .access(access)
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    resources = resources.devices(devices);
    linux.set_resources(Some(resources.build()?));
    // Privileged: no seccomp filter, as Docker and Kubernetes do.
    if !run.privileged {
        linux.set_seccomp(Some(seccomp::default_profile(host, &bounding)?));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// The user `image` runs as: its `USER`, resolved in the image's `/etc/passwd` and
/// `/etc/group`, which are read from the container's snapshot `mounts` only when a name (or
/// a uid without a group, for its gid) asks for them. Root when the image names no user.
pub(super) async fn image_user(
    image: &PreparedImage,
    mounts: &[containerd_client::types::Mount],
) -> Result<ProcessUser, ContainerdError> {
    let bad_user = |source| ContainerdError::User {
        image: image.name.clone(),
        source,
    };
    let Some(spec) = UserSpec::parse(&image.config.user).map_err(bad_user)? else {
        return Ok(ProcessUser::default());
    };
    let (passwd, group) = if spec.needs_files() {
        let layers = rootfs::layers(mounts);
        let read = tokio::task::spawn_blocking(move || {
            let layers = layers?;
            let text = |path| {
                rootfs::read_file(&layers, path)
                    .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            };
            Ok((text("/etc/passwd")?, text("/etc/group")?))
        })
        .await
        .unwrap_or_else(|e| {
            Err(rootfs::RootfsError::Io {
                path: "/etc/passwd".into(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        read.map_err(|source| ContainerdError::Rootfs {
            image: image.name.clone(),
            user: image.config.user.clone(),
            source,
        })?
    } else {
        (None, None)
    };
    user::resolve(&spec, passwd.as_deref(), group.as_deref()).map_err(bad_user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    fn run() -> ContainerRun {
        ContainerRun {
            id: "web-0".into(),
            command: vec![],
            args: vec![],
            env: BTreeMap::from([
                ("GREETING".into(), "hi".into()),
                ("PATH".into(), "/x".into()),
            ]),
            memory_limit: 64 << 20,
            cpu_millis: Some(250),
            read_only_root: true,
            mounts: vec![crate::runtime::Mount {
                host: "/var/lib/shoal/volumes/web/data".into(),
                guest: "/data".into(),
                read_only: false,
            }],
            log_path: "/l".into(),
            log_max_bytes: 1 << 20,
            stop_grace: Duration::from_secs(1),
            labels: BTreeMap::new(),
            devices: vec![],
            cap_add: vec![],
            cap_drop: vec![],
            groups: vec![],
            privileged: false,
            host_devices: vec![],
            allow: Default::default(),
        }
    }

    #[test]
    fn privileges_need_the_devices_consent_and_give_what_they_say() {
        use shoal_api::policy::fleet::Privilege;
        let node = |path: &str, major: u64| crate::hardware::NodeInfo {
            path: path.into(),
            source: "/dev/ttyACM0".into(),
            block: false,
            major,
            minor: 1,
            gid: 20,
        };
        // Asked for, not allowed here: refused, whatever the hub said.
        let mut r = run();
        r.privileged = true;
        let err = runtime_spec(&image(), &r, "shoal", &app_user(), &HOST).unwrap_err();
        assert!(
            err.to_string()
                .contains("privileged containers are not allowed on this device"),
            "{err}"
        );
        let mut h = run();
        h.host_devices = vec![(node("/dev/ttyS9", 166), "r".into())];
        let err = runtime_spec(&image(), &h, "shoal", &app_user(), &HOST).unwrap_err();
        assert!(err.to_string().contains("--allow host-devices"), "{err}");

        // A host node by path: mounted at its container path, allowed with its access only.
        h.allow = [Privilege::HostDevices].into();
        let spec = spec_of(&image(), &h);
        assert!(spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/dev/ttyS9")
                && m.source().as_deref() == Some(Path::new("/dev/ttyACM0"))));
        let linux = spec.linux().as_ref().unwrap();
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        let this: Vec<_> = rules.iter().filter(|d| d.major() == Some(166)).collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].access().as_deref(), Some("r"));
        assert!(linux.seccomp().is_some(), "still confined otherwise");

        // Privileged: every capability, no seccomp filter, every device, the device's /dev.
        r.allow = [Privilege::Privileged].into();
        let spec = spec_of(&image(), &r);
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        assert!(caps.bounding().as_ref().unwrap().len() >= 38);
        // Only those the agent holds.
        let held = seccomp::Host {
            cap_bounding: Some(0x1_feff_ffff),
            ..HOST
        };
        let spec = runtime_spec(&image(), &r, "shoal", &app_user(), &held).unwrap();
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        let names: Vec<String> = caps
            .bounding()
            .clone()
            .unwrap()
            .iter()
            .map(|c| {
                serde_json::to_value(c)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(
            !names.contains(&"CAP_SYS_RESOURCE".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"CAP_SYS_ADMIN".to_string()), "{names:?}");
        let spec = spec_of(&image(), &r);
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_none());
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        assert!(rules[0].allow() && rules[0].typ().is_none() && rules[0].major().is_none());
        assert!(linux.masked_paths().is_none());
        let dev = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/dev"))
            .cloned()
            .unwrap();
        assert_eq!(dev.source().as_deref(), Some(Path::new("/dev")));
        // And not for the confined default.
        let plain = spec_of(&image(), &run());
        assert!(plain.linux().as_ref().unwrap().seccomp().is_some());
    }

    fn image() -> ImageConfig {
        ImageConfig::from_blob(
            br#"{"config":{"Env":["PATH=/bin","A=1"],"Entrypoint":["/bin/busybox"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap()
    }

    const HOST: seccomp::Host = seccomp::Host {
        arch: "x86_64",
        kernel: Some((6, 1)),
        cap_bounding: None,
    };

    fn app_user() -> ProcessUser {
        ProcessUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![1000, 2000],
        }
    }

    fn spec_of(image: &ImageConfig, run: &ContainerRun) -> oci_spec::runtime::Spec {
        runtime_spec(image, run, "shoal", &app_user(), &HOST).unwrap()
    }

    #[test]
    fn the_spec_confines_the_process() {
        let spec = spec_of(&image(), &run());
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(
            p.user().additional_gids().as_deref(),
            Some(&[1000, 2000][..])
        );
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(
            seccomp.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert!(seccomp.syscalls().as_ref().is_some_and(|s| !s.is_empty()));
        // Root, when the image names no user: no supplementary groups forced on it.
        let root = runtime_spec(&image(), &run(), "shoal", &ProcessUser::default(), &HOST).unwrap();
        let u = root.process().as_ref().unwrap().user().clone();
        assert_eq!(
            (u.uid(), u.gid(), u.additional_gids().clone()),
            (0, 0, None)
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["process"]["user"]["additionalGids"][1], 2000);
    }

    #[tokio::test]
    async fn the_image_user_is_read_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("1/fs"), dir.path().join("2/fs"));
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(
            lower.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(lower.join("etc/group"), "app:x:1234:\nsensors:x:2000:app\n").unwrap();
        let overlay = containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.display()),
            ],
            ..Default::default()
        };
        let zfs = containerd_client::types::Mount {
            r#type: "zfs".into(),
            ..Default::default()
        };
        let image = |user: &str| PreparedImage {
            name: "reg/app@sha256:ab".into(),
            chain: String::new(),
            config: ImageConfig {
                user: user.into(),
                ..Default::default()
            },
        };
        let user = |uid, gid, more: &[u32]| ProcessUser {
            uid,
            gid,
            additional_gids: more.to_vec(),
        };
        let ok = [
            ("", &overlay, ProcessUser::default()),
            ("app", &overlay, user(1234, 1234, &[1234, 2000])),
            ("1234", &overlay, user(1234, 1234, &[1234, 2000])),
            ("app:5", &overlay, user(1234, 5, &[])),
            // Both numbers: nothing to read, whatever the mount.
            ("7:8", &zfs, user(7, 8, &[])),
        ];
        for (name, mount, want) in ok {
            let got = image_user(&image(name), std::slice::from_ref(mount)).await;
            assert_eq!(got.unwrap(), want, "{name:?}");
        }
        let err = |name: &str, mount: &containerd_client::types::Mount| {
            let image = image(name);
            let mounts = [mount.clone()];
            async move { image_user(&image, &mounts).await.unwrap_err().to_string() }
        };
        assert_eq!(
            err("nobody-here", &overlay).await,
            r#"image reg/app@sha256:ab: user "nobody-here" is not in the image's /etc/passwd"#
        );
        assert_eq!(
            err("app:", &overlay).await,
            r#"image reg/app@sha256:ab: invalid user "app:": expected user or user:group, each a name or a number"#
        );
        let e = err("app", &zfs).await;
        assert!(
            e.contains(r#"resolve user "app""#) && e.contains(r#""zfs" mount"#),
            "{e}"
        );
    }

    #[test]
    fn the_spec_merges_image_and_manifest() {
        let spec = spec_of(&image(), &run());
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/busybox", "sh"]);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/x".to_string()) && !env.contains(&"PATH=/bin".to_string()));
        assert!(env.contains(&"A=1".to_string()) && env.contains(&"GREETING=hi".to_string()));
        assert_eq!(p.cwd(), &PathBuf::from("/w"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let data = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == &PathBuf::from("/data"))
            .unwrap();
        assert_eq!(data.typ().as_deref(), Some("bind"));
        assert_eq!(
            data.source().as_deref(),
            Some(Path::new("/var/lib/shoal/volumes/web/data"))
        );
        assert!(data.options().as_ref().unwrap().contains(&"rw".to_string()));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_ref().unwrap(),
            &PathBuf::from("/shoal/web-0")
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(25_000));
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network));
        // Manifest args replace Cmd; a command replaces the entrypoint (and Cmd).
        let mut r = run();
        r.args = vec!["-c".into(), "echo hi".into()];
        let spec = spec_of(&image(), &r);
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/busybox", "-c", "echo hi"]
        );
        r.command = vec!["/bin/true".into()];
        r.args.clear();
        let spec = spec_of(&image(), &r);
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/true"]
        );
        let e =
            runtime_spec(&ImageConfig::default(), &run(), "shoal", &app_user(), &HOST).unwrap_err();
        assert!(matches!(e, SpecError::NothingToRun), "{e}");
    }

    #[test]
    fn a_granted_node_is_mounted_and_allowed_and_no_other_is() {
        let plain = spec_of(&image(), &run());
        let mounts = |s: &oci_spec::runtime::Spec| s.mounts().clone().unwrap_or_default();
        let mut r = run();
        r.devices = vec![crate::hardware::NodeInfo {
            path: "/dev/serial/by-id/usb-ftdi".into(),
            source: "/dev/ttyUSB0".into(),
            block: false,
            major: 188,
            minor: 0,
            gid: 20,
        }];
        let spec = spec_of(&image(), &r);
        assert_eq!(mounts(&spec).len(), mounts(&plain).len() + 1);
        let node = mounts(&spec)
            .into_iter()
            .find(|m| m.destination() == &PathBuf::from("/dev/serial/by-id/usb-ftdi"))
            .unwrap();
        assert_eq!(node.source().as_deref(), Some(Path::new("/dev/ttyUSB0")));
        let options = node.options().clone().unwrap();
        assert!(!options.contains(&"nodev".to_string()), "{options:?}");
        assert!(options.contains(&"nosuid".to_string()), "{options:?}");
        let linux = spec.linux().as_ref().unwrap();
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        // Denied first, then allowed: the usual ones and exactly this node.
        assert!(!rules[0].allow());
        let this: Vec<_> = rules
            .iter()
            .filter(|d| d.allow() && d.major() == Some(188))
            .collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].minor(), Some(0));
        assert_eq!(this[0].access().as_deref(), Some("rw"), "no mknod");
        // A non-root process gets the node's group, so a 0660 root:dialout node opens.
        let gids = spec
            .process()
            .as_ref()
            .unwrap()
            .user()
            .additional_gids()
            .clone();
        assert!(gids.unwrap().contains(&20));
    }

    #[test]
    fn capabilities_are_the_defaults_less_drop_plus_add_and_nothing_beyond() {
        let caps = |s: &oci_spec::runtime::Spec| {
            let c = s
                .process()
                .as_ref()
                .unwrap()
                .capabilities()
                .clone()
                .unwrap();
            let mut v: Vec<String> = c
                .bounding()
                .clone()
                .unwrap()
                .iter()
                .map(|c| {
                    serde_json::to_value(c)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect();
            v.sort();
            assert_eq!(c.effective(), c.bounding());
            v
        };
        let ambient = |s: &oci_spec::runtime::Spec| {
            let c = s
                .process()
                .as_ref()
                .unwrap()
                .capabilities()
                .clone()
                .unwrap();
            c.ambient().clone().unwrap().len()
        };
        assert_eq!(
            caps(&spec_of(&image(), &run())),
            ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        );
        let mut r = run();
        assert_eq!(ambient(&spec_of(&image(), &run())), 3);
        r.cap_add = vec!["CHOWN".into(), "KILL".into()];
        r.cap_drop = vec!["ALL".into()];
        r.groups = vec![4242];
        let s = spec_of(&image(), &r);
        assert_eq!(caps(&s), ["CAP_CHOWN", "CAP_KILL"]);
        // Only the default one (KILL) is ambient: an added CHOWN does not reach a non-root user.
        assert_eq!(ambient(&s), 1);
        let gids = s
            .process()
            .as_ref()
            .unwrap()
            .user()
            .additional_gids()
            .clone();
        assert!(gids.unwrap().contains(&4242));
        // A desired state asking for more is refused by the device too.
        r.cap_add = vec!["SYS_ADMIN".into()];
        let e = runtime_spec(&image(), &r, "shoal", &app_user(), &HOST).unwrap_err();
        assert!(matches!(e, SpecError::Capabilities(_)), "{e}");
    }
}
