// Package deploy_test checks the operator files: every manifest decodes
// strictly, the alert rules are well formed, and every PromQL expression in
// the alerts and the dashboard names only metrics the proxy exports.
// (CI also runs promtool check rules / test rules on the alerts.)
package deploy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// exported returns the names of every metric family the proxy registers.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New(prometheus.NewRegistry())
	names := map[string]bool{}
	v := reflect.ValueOf(m).Elem()
	nameRE := regexp.MustCompile(`fqName: "([^"]+)"`)
	for i := range v.NumField() {
		c, ok := v.Field(i).Interface().(prometheus.Collector)
		if !ok {
			t.Fatalf("metrics field %s is not a collector", v.Type().Field(i).Name)
		}
		ch := make(chan *prometheus.Desc, 8)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			if sub := nameRE.FindStringSubmatch(d.String()); sub != nil {
				names[sub[1]] = true
			}
		}
	}
	if len(names) < 15 {
		t.Fatalf("only %d metric names found: %v", len(names), names)
	}
	return names
}

var metricRE = regexp.MustCompile(`portrait_proxy_[a-z0-9_]+`)

// checkNames fails for any metric in expr the proxy does not export.
func checkNames(t *testing.T, where, expr string, names map[string]bool) {
	t.Helper()
	found := metricRE.FindAllString(expr, -1)
	if len(found) == 0 {
		t.Errorf("%s: expression names no proxy metric: %s", where, expr)
	}
	for _, n := range found {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && names[b] {
				base = b
			}
		}
		if !names[base] {
			t.Errorf("%s: %s is not a metric the proxy exports", where, n)
		}
	}
}

// decodeStrict decodes every YAML document in path into a fresh T with
// unknown fields refused, and returns them.
func decodeStrict[T any](t *testing.T, path string) []T {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	var out []T
	for {
		var v T
		if err := dec.Decode(&v); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, v)
	}
	return out
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func TestAlertRules(t *testing.T) {
	names := exported(t)
	files := decodeStrict[ruleFile](t, "prometheus/alerts.yml")
	want := map[string]bool{"PortraitProxyQuotaSaturated": false, "PortraitProxyUpstreamThrottling": false,
		"PortraitProxyUpstreamErrors": false, "PortraitProxyRedisUnreachable": false, "PortraitProxyServingStale": false,
		"PortraitProxyHighLatency": false}
	nameRE := regexp.MustCompile(`^PortraitProxy[A-Z][A-Za-z]+$`)
	for _, g := range files[0].Groups {
		for _, r := range g.Rules {
			if !nameRE.MatchString(r.Alert) {
				t.Errorf("alert %q: not CamelCase with the PortraitProxy prefix", r.Alert)
			}
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: severity %q", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: summary and description are required", r.Alert)
			}
			checkNames(t, r.Alert, r.Expr, names)
			if _, ok := want[r.Alert]; ok {
				want[r.Alert] = true
			}
		}
	}
	for a, seen := range want {
		if !seen {
			t.Errorf("alert %s is missing", a)
		}
	}
}

type dashboard struct {
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query string `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Title      string `json:"title"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
		FieldConfig struct {
			Defaults struct {
				Unit string `json:"unit"`
			} `json:"defaults"`
		} `json:"fieldConfig"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

func TestDashboard(t *testing.T) {
	names := exported(t)
	raw, err := os.ReadFile("grafana/portrait-proxy.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		hasDS = hasDS || (v.Type == "datasource" && v.Query == "prometheus" && v.Name == "datasource")
	}
	if !hasDS {
		t.Error("no datasource variable")
	}
	if len(d.Panels) < 10 {
		t.Errorf("%d panels", len(d.Panels))
	}
	for _, p := range d.Panels {
		if p.FieldConfig.Defaults.Unit == "" {
			t.Errorf("panel %q has no unit", p.Title)
		}
		if p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q does not use the datasource variable", p.Title)
		}
		for _, tg := range p.Targets {
			checkNames(t, p.Title, tg.Expr, names)
			if strings.Contains(tg.Expr, "rate(") && !strings.Contains(tg.Expr, "[$__rate_interval]") {
				t.Errorf("panel %q: rate without $__rate_interval: %s", p.Title, tg.Expr)
			}
		}
	}
}

type object struct {
	APIVersion string         `yaml:"apiVersion"`
	Kind       string         `yaml:"kind"`
	Metadata   map[string]any `yaml:"metadata"`
	Spec       map[string]any `yaml:"spec"`
}

type kustomization struct {
	APIVersion         string           `yaml:"apiVersion"`
	Kind               string           `yaml:"kind"`
	Namespace          string           `yaml:"namespace"`
	Labels             []map[string]any `yaml:"labels"`
	Resources          []string         `yaml:"resources"`
	ConfigMapGenerator []struct {
		Name     string   `yaml:"name"`
		Literals []string `yaml:"literals"`
	} `yaml:"configMapGenerator"`
}

func TestKubernetesManifests(t *testing.T) {
	k := decodeStrict[kustomization](t, "kubernetes/kustomization.yaml")[0]
	kinds := map[string]bool{}
	for _, r := range k.Resources {
		for _, o := range decodeStrict[object](t, filepath.Join("kubernetes", r)) {
			if o.APIVersion == "" || o.Kind == "" || o.Metadata["name"] == nil {
				t.Errorf("%s: apiVersion, kind and metadata.name are required", r)
			}
			kinds[o.Kind] = true
		}
	}
	for _, want := range []string{"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} {
		if !kinds[want] {
			t.Errorf("no %s", want)
		}
	}
	for _, lit := range k.ConfigMapGenerator[0].Literals {
		name, _, _ := strings.Cut(lit, "=")
		if !strings.HasPrefix(name, "PROXY_") || strings.Contains(name, "SECRET") {
			t.Errorf("config literal %q: flags only, and never the secret key", lit)
		}
	}
	dep, err := os.ReadFile("kubernetes/deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, must := range []string{"readOnlyRootFilesystem: true", "runAsNonRoot: true", "path: /readyz", "path: /healthz", "secretRef:", "allowPrivilegeEscalation: false"} {
		if !bytes.Contains(dep, []byte(must)) {
			t.Errorf("deployment lacks %q", must)
		}
	}
}

func TestComposeAndPrometheusConfigDecode(t *testing.T) {
	for _, f := range []string{"docker-compose.yml", "docker-compose.tls.yml", "prometheus/prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
		"grafana/provisioning/dashboards/dashboards.yml"} {
		if docs := decodeStrict[map[string]any](t, f); len(docs) == 0 {
			t.Errorf("%s is empty", f)
		}
	}
	df, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, must := range []string{"CGO_ENABLED=0", "distroless/static", "nonroot"} {
		if !bytes.Contains(df, []byte(must)) {
			t.Errorf("Dockerfile lacks %q", must)
		}
	}
}

// TestRenderedManifests decodes `kustomize build deploy/kubernetes` (run
// by make check-deploy, which sets KUSTOMIZE_OUTPUT) strictly and checks
// that the generated ConfigMap is the one the Deployment reads.
func TestRenderedManifests(t *testing.T) {
	path := os.Getenv("KUSTOMIZE_OUTPUT")
	if path == "" {
		t.Skip("KUSTOMIZE_OUTPUT not set: make check-deploy renders the manifests and runs this test")
	}
	type rendered struct {
		APIVersion string            `yaml:"apiVersion"`
		Kind       string            `yaml:"kind"`
		Metadata   map[string]any    `yaml:"metadata"`
		Spec       map[string]any    `yaml:"spec"`
		Data       map[string]string `yaml:"data"`
	}
	objs := decodeStrict[rendered](t, path)
	var cmName, envFrom string
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.Kind]++
		if o.Metadata["namespace"] != "portrait-proxy" {
			t.Errorf("%s %v: namespace %v", o.Kind, o.Metadata["name"], o.Metadata["namespace"])
		}
		switch o.Kind {
		case "ConfigMap":
			cmName, _ = o.Metadata["name"].(string)
			if o.Data["PROXY_SDKAPPID"] == "" {
				t.Error("ConfigMap lacks PROXY_SDKAPPID")
			}
		case "Deployment":
			raw, _ := yaml.Marshal(o.Spec)
			m := regexp.MustCompile(`configMapRef:\s+name: (\S+)`).FindSubmatch(raw)
			if m == nil {
				t.Fatal("Deployment reads no ConfigMap")
			}
			envFrom = string(m[1])
		}
	}
	if len(objs) != 5 || kinds["Deployment"] != 1 || kinds["ConfigMap"] != 1 || kinds["Service"] != 1 ||
		kinds["HorizontalPodAutoscaler"] != 1 || kinds["PodDisruptionBudget"] != 1 {
		t.Fatalf("rendered %v", kinds)
	}
	if cmName == "" || cmName != envFrom {
		t.Fatalf("Deployment reads ConfigMap %q, kustomize generated %q", envFrom, cmName)
	}
}

// TestTLSComponent decodes the TLS component strictly: the Secret is
// mounted as a directory (a subPath mount would never see a renewal) at the
// path the flags name.
func TestTLSComponent(t *testing.T) {
	type component struct {
		APIVersion string   `yaml:"apiVersion"`
		Kind       string   `yaml:"kind"`
		Resources  []string `yaml:"resources"`
		Patches    []struct {
			Path string `yaml:"path"`
		} `yaml:"patches"`
		ConfigMapGenerator []struct {
			Name     string   `yaml:"name"`
			Behavior string   `yaml:"behavior"`
			Literals []string `yaml:"literals"`
		} `yaml:"configMapGenerator"`
	}
	c := decodeStrict[component](t, "kubernetes/tls/kustomization.yaml")[0]
	if c.Kind != "Component" || len(c.Resources) != 1 || len(c.Patches) != 1 || c.ConfigMapGenerator[0].Behavior != "merge" {
		t.Fatalf("component %+v", c)
	}
	for _, f := range append(c.Resources, c.Patches[0].Path) {
		for _, o := range decodeStrict[object](t, filepath.Join("kubernetes/tls", f)) {
			if o.APIVersion == "" || o.Kind == "" || o.Metadata["name"] == nil {
				t.Errorf("%s: apiVersion, kind and metadata.name are required", f)
			}
		}
	}
	patch, err := os.ReadFile("kubernetes/tls/deployment-tls.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(patch, []byte("subPath")) || !bytes.Contains(patch, []byte("mountPath: /etc/portrait-proxy/tls")) {
		t.Error("the certificate must be mounted as a directory at /etc/portrait-proxy/tls")
	}
	for _, lit := range c.ConfigMapGenerator[0].Literals {
		if _, v, _ := strings.Cut(lit, "="); !strings.HasPrefix(v, "/etc/portrait-proxy/tls/") {
			t.Errorf("%s: not under the mounted directory", lit)
		}
	}
}

// The admin port (metrics, probes, pprof when enabled) is not behind the
// Service, and the pod binds it to its own address, not every interface.
func TestAdminPortNotExposed(t *testing.T) {
	svc, err := os.ReadFile("kubernetes/service.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range decodeStrict[object](t, "kubernetes/service.yaml") {
		raw, _ := yaml.Marshal(o.Spec)
		if strings.Contains(string(raw), "9090") || strings.Contains(string(raw), "admin") {
			t.Fatalf("the Service exposes the admin port:\n%s", svc)
		}
	}
	dep, err := os.ReadFile("kubernetes/deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(dep), `"-admin-listen", "$(POD_IP):9090"`) || !strings.Contains(string(dep), "status.podIP") {
		t.Fatal("the Deployment does not bind the admin listener to the pod's address")
	}
	if strings.Contains(string(dep), `"-pprof"`) {
		t.Fatal("the Deployment turns pprof on")
	}
}
