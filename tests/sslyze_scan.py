"""Run sslyze's Mozilla check against one edge name; print the verdict as JSON.

Runs under ``.venv-scan/bin/python`` (``make deps``), not the project's venv:
sslyze 6.3 pins ``cryptography<47`` while certbot's ``acme`` needs ``>=47``, so
the scanner lives in its own environment and talks to the edge over the wire
only, like the scanner a security engineer would point at it.

Usage: python sslyze_scan.py HOSTNAME PORT CA_FILE [intermediate|modern]
Prints {"compliant": bool, "issues": {name: text}, "curves": [...],
"tls_1_2": [...], "tls_1_3": [...], "versions": [...]}.
"""

import json
import sys
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)


def main() -> int:
    hostname, port, ca_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    profile = sys.argv[4] if len(sys.argv) > 4 else "intermediate"
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=hostname, port=port, ip_address="127.0.0.1"),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    out: dict[str, object] = {"status": result.scan_status.name, "connectivity": result.connectivity_status.name}
    if result.scan_result is None:
        out["error"] = str(result.connectivity_error_trace)
        print(json.dumps(out))
        return 1
    # What `sslyze --mozilla_config=PROFILE` runs (sslyze/__main__.py).
    try:
        check_server_against_tls_configuration(result, MozillaTlsConfiguration.get(TlsConfigurationEnum(profile)))
        out["compliant"], out["issues"] = True, {}
    except ServerNotCompliantWithTlsConfiguration as exc:
        out["compliant"], out["issues"] = False, exc.issues
    scan = result.scan_result
    out["curves"] = sorted(c.name for c in scan.elliptic_curves.result.supported_curves)  # type: ignore[union-attr]
    versions = []
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        accepted = getattr(scan, f"{name}_cipher_suites").result.accepted_cipher_suites
        if accepted:
            versions.append(name)
        if name in ("tls_1_2", "tls_1_3"):
            out[name] = sorted(c.cipher_suite.name for c in accepted)
    out["versions"] = versions
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
