//go:build tools

// Package tools pins the Helm CLI's main package in go.mod, so
// `go build helm.sh/helm/v4/cmd/helm` from this module uses the versions MVS
// chose here (scripts/build-tools.sh).
package tools

import _ "helm.sh/helm/v4/cmd/helm"
