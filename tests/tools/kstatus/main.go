// Command kstatus reads Kubernetes objects as JSON on stdin — one object, a
// List (`kubectl get ... -o json`), or a stream of objects — and prints one
// JSON line per object with its kstatus, computed by
// sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute:
//
//	{"kind":"Deployment","name":"eg-operator","status":"InProgress","message":"..."}
//
// status is one of InProgress, Failed, Current, Terminating, NotFound, Unknown.
// An empty List prints nothing. Bad input (empty, not JSON, not an object, an
// object without kind) exits 1 with a message on stderr.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type line struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: kstatus < objects.json (one object, a List, or a stream of objects)")
		os.Exit(2)
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	dec := json.NewDecoder(bufio.NewReader(in))
	dec.UseNumber()
	w := bufio.NewWriter(out)
	defer w.Flush()
	enc := json.NewEncoder(w)
	docs := 0
	for doc := 1; ; doc++ {
		var obj map[string]any
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("input document %d is not a JSON object: %w", doc, err)
		}
		if obj == nil {
			return fmt.Errorf("input document %d is null, not an object", doc)
		}
		docs++
		objects, err := expand(obj, doc)
		if err != nil {
			return err
		}
		for _, o := range objects {
			l, err := compute(o)
			if err != nil {
				return fmt.Errorf("input document %d: %w", doc, err)
			}
			if err := enc.Encode(l); err != nil {
				return err
			}
		}
	}
	if docs == 0 {
		return errors.New("no JSON on stdin")
	}
	return nil
}

// expand turns a List (kind v1/List or any *List with items) into its items.
func expand(obj map[string]any, doc int) ([]map[string]any, error) {
	kind, _ := obj["kind"].(string)
	items, hasItems := obj["items"]
	if !hasItems || !strings.HasSuffix(kind, "List") {
		return []map[string]any{obj}, nil
	}
	if items == nil {
		return nil, nil
	}
	arr, ok := items.([]any)
	if !ok {
		return nil, fmt.Errorf("input document %d: %s.items is not an array", doc, kind)
	}
	res := make([]map[string]any, 0, len(arr))
	for i, it := range arr {
		m, ok := it.(map[string]any)
		if !ok || m == nil {
			return nil, fmt.Errorf("input document %d: %s.items[%d] is not an object", doc, kind, i)
		}
		res = append(res, m)
	}
	return res, nil
}

func compute(obj map[string]any) (line, error) {
	u := &unstructured.Unstructured{Object: normalize(obj).(map[string]any)}
	if u.GetKind() == "" {
		return line{}, errors.New("an object without kind")
	}
	res, err := status.Compute(u)
	if err != nil {
		return line{}, fmt.Errorf("%s %q: %w", u.GetKind(), u.GetName(), err)
	}
	return line{Kind: u.GetKind(), Name: u.GetName(), Status: res.Status.String(), Message: res.Message}, nil
}

// normalize turns json.Number into int64 or float64, the types unstructured
// accessors (status.observedGeneration, replicas) expect.
func normalize(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = normalize(e)
		}
		return x
	case []any:
		for i, e := range x {
			x[i] = normalize(e)
		}
		return x
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i
		}
		f, _ := x.Float64()
		return f
	default:
		return v
	}
}
