//! A network namespace with a veth pair to the host (`cli_faults.rs`: a site on another host).

use std::process::{Command, Stdio};

/// A network namespace with a veth pair to the host, removed on drop. Needs root and `ip`.
pub struct Namespace {
    pub name: String,
    pub host_side: String,
}

impl Namespace {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `10.<a>.<b>.1` on the host side, `.2` inside; None when namespaces are not available.
    pub fn create(tag: u32) -> Option<(Namespace, String, String)> {
        let (name, host_side, inside) = (
            format!("lowband-t{tag}"),
            format!("lbh{tag}"),
            format!("lbn{tag}"),
        );
        let (a, b) = (200 + (tag % 50), (tag / 50) % 250);
        let (host_ip, site_ip) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        if !Namespace::ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Namespace {
            name: name.clone(),
            host_side: host_side.clone(),
        };
        let ok = Namespace::ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &inside,
        ]) && Namespace::ip(&["link", "set", &inside, "netns", &name])
            && Namespace::ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_side])
            && Namespace::ip(&["link", "set", &host_side, "up"])
            && Namespace::ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{site_ip}/24"),
                "dev",
                &inside,
            ])
            && Namespace::ip(&["-n", &name, "link", "set", &inside, "up"])
            && Namespace::ip(&["-n", &name, "link", "set", "lo", "up"]);
        ok.then_some((ns, host_ip, site_ip))
    }

    pub fn link(&self, up: bool) {
        assert!(
            Namespace::ip(&[
                "link",
                "set",
                &self.host_side,
                if up { "up" } else { "down" }
            ]),
            "ip link set {} failed",
            self.host_side
        );
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        Namespace::ip(&["link", "del", &self.host_side]);
        Namespace::ip(&["netns", "del", &self.name]);
    }
}
