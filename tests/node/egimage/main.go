// Command egimage builds the project's container images without a Docker engine
// and serves them to the test nodes from a registry, the way a cluster pulls:
//
//	egimage build --file SRC:DST[:MODE]... --entrypoint PATH [--cmd ARG]... [--user UID] [--push REF] [--oci DIR]
//	egimage serve --addr HOST:PORT [--log FILE]
//
// build writes one layer holding exactly the named files (owner 0:0, modification
// time 0, the parent directories 0755), an OCI config with a zero creation time,
// and prints the manifest digest: the same files give the same digest, on any
// machine. --push sends the image to a registry (plain HTTP: the test registry);
// --oci also writes it as an OCI layout directory.
// serve runs an in-memory OCI distribution registry (go-containerregistry's).
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

// file is one entry of the layer: a file on this machine and where it goes.
type file struct {
	src, dst string
	mode     int64
}

func parseFile(s string) (file, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || !path.IsAbs(parts[1]) {
		return file{}, fmt.Errorf("--file %q: want SRC:DST[:MODE] with an absolute DST", s)
	}
	f := file{src: parts[0], dst: path.Clean(parts[1]), mode: 0o755}
	if len(parts) == 3 {
		m, err := strconv.ParseInt(parts[2], 8, 32)
		if err != nil {
			return file{}, fmt.Errorf("--file %q: MODE %q is not octal", s, parts[2])
		}
		f.mode = m
	}
	return f, nil
}

// layerTar is the uncompressed layer: directories first, then files, sorted, every
// header with the same owner and time so the bytes depend on the contents only.
func layerTar(files []file) ([]byte, error) {
	sort.Slice(files, func(i, j int) bool { return files[i].dst < files[j].dst })
	dirs := map[string]bool{}
	for _, f := range files {
		for d := path.Dir(f.dst); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var sorted []string
	for d := range dirs {
		sorted = append(sorted, d)
	}
	sort.Strings(sorted)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0).UTC()
	for _, d := range sorted {
		h := &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: 0o755,
			ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	for _, f := range files {
		data, err := os.ReadFile(f.src)
		if err != nil {
			return nil, fmt.Errorf("--file %s: %w", f.src, err)
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(f.dst, "/"), Mode: f.mode,
			Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func image(files []file, entrypoint string, cmd []string, user string) (v1.Image, error) {
	raw, err := layerTar(files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.History = nil
	cf.Config.Entrypoint = []string{entrypoint}
	cf.Config.Cmd = cmd
	cf.Config.User = user
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	return mutate.ConfigFile(img, cf)
}

func build(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	var files, cmd list
	fs.Var(&files, "file", "SRC:DST[:MODE] (repeatable)")
	fs.Var(&cmd, "cmd", "default argument (repeatable)")
	entrypoint := fs.String("entrypoint", "", "the image's entrypoint (absolute path)")
	user := fs.String("user", "", "the image's user (UID)")
	push := fs.String("push", "", "registry reference to push to (plain HTTP)")
	oci := fs.String("oci", "", "also write an OCI layout to this directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(files) == 0 || *entrypoint == "" {
		return errors.New("build: --file and --entrypoint are required")
	}
	var fl []file
	for _, s := range files {
		f, err := parseFile(s)
		if err != nil {
			return err
		}
		fl = append(fl, f)
	}
	img, err := image(fl, *entrypoint, cmd, *user)
	if err != nil {
		return err
	}
	if *oci != "" {
		p, err := layout.Write(*oci, empty.Index)
		if err != nil {
			return err
		}
		if err := p.AppendImage(img); err != nil {
			return err
		}
	}
	if *push != "" {
		ref, err := name.ParseReference(*push, name.Insecure)
		if err != nil {
			return fmt.Errorf("--push %q: %w", *push, err)
		}
		if err := remote.Write(ref, img); err != nil {
			return fmt.Errorf("push %s: %w", ref, err)
		}
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	m, err := img.RawManifest()
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	var size int64
	for _, l := range layers {
		s, err := l.Size()
		if err != nil {
			return err
		}
		size += s
	}
	fmt.Printf("%s %d\n", d, size+int64(len(m)))
	return nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:5000", "listen address")
	logPath := fs.String("log", "", "append one line per request to this file (default: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var w io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		w = f
	}
	srv := &http.Server{Addr: *addr, Handler: registry.New(registry.Logger(log.New(w, "", log.LstdFlags))),
		ReadHeaderTimeout: 10 * time.Second}
	return srv.ListenAndServe()
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: egimage build ... | egimage serve --addr HOST:PORT")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = build(os.Args[2:])
	case "serve":
		err = serve(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (build, serve)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "egimage:", err)
		os.Exit(1)
	}
}
