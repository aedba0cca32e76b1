"""Compare runs: accuracy against memory and latency with the Pareto frontier, tables, samples,
and a URL that reproduces the comparison. The selection lives in the query parameters."""
from urllib.parse import urlencode

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.compare import (LATENCY_METRICS, MEMORY_METRICS, Y_METRICS, pareto_mask, parse_share_query,
                          protocol, protocol_key, runs_frame, samples_by_prompt, share_query)
from core.store import Store

store = st.session_state.get("store") or Store()
st.title("Compare")

runs = store.list()
by_id = {r.id: r for r in runs}
if not runs:
    st.info("No experiments yet.")
    st.page_link("pages/new_experiment.py", label="Start one on the New experiment page", icon=":material/science:")
    st.stop()

# (Re)load the widgets from the URL when it differs from what this page last wrote into it (a shared
# link, arrival from another page with ?runs=...) or when streamlit dropped the widgets' state
# (after visiting another page). Without ?runs, keep this session's previous selection, else
# default to the done runs of the latest protocol.
qp = st.query_params.to_dict()
if qp != st.session_state.get("_cmp_written") or "cmp_runs" not in st.session_state:
    if "runs" not in qp and st.session_state.get("_cmp_written"):
        qp = st.session_state["_cmp_written"]
    ids, view = parse_share_query(qp)
    if "runs" not in qp:
        done = [r for r in runs if r.status == "done"]
        ids = [r.id for r in done if protocol_key(r) == protocol_key(done[0])][:12] if done else []
    st.session_state["_cmp_missing"] = [i for i in ids if i not in by_id]
    st.session_state["cmp_runs"] = [i for i in ids if i in by_id]
    for k in ("y", "mem", "lat", "log"):
        st.session_state[f"cmp_{k}"] = view[k]

selected = st.multiselect(
    "Runs", list(by_id), key="cmp_runs", placeholder="Choose runs to compare",
    format_func=lambda i: f"{by_id[i].label} · {i}" + ("" if by_id[i].status == "done" else f" ({by_id[i].status})"),
)
c1, c2, c3, c4 = st.columns([2, 2, 3, 1], vertical_alignment="bottom")
y = c1.selectbox("Accuracy (y)", list(Y_METRICS), key="cmp_y", format_func=Y_METRICS.get)
mem = c2.selectbox("Memory (x, left chart)", list(MEMORY_METRICS), key="cmp_mem", format_func=MEMORY_METRICS.get)
lat = c3.selectbox("Latency (x, right chart)", list(LATENCY_METRICS), key="cmp_lat", format_func=LATENCY_METRICS.get)
log_y = c4.checkbox("Log y", key="cmp_log")

query = share_query(selected, y=y, mem=mem, lat=lat, log=log_y)
if st.query_params.to_dict() != query:
    st.query_params.from_dict(query)  # keep the address bar shareable too
st.session_state["_cmp_written"] = query

if missing := st.session_state.get("_cmp_missing"):
    st.warning(f"Not in this store (deleted, or the link comes from another installation): {', '.join(missing)}")
if not selected:
    st.info("Choose runs to compare.")
    st.stop()

chosen = [by_id[i] for i in selected]
df = runs_frame(chosen)
names = dict(zip(df["id"], df["display"]))

with st.expander("Share this comparison", icon=":material/share:"):
    url = f"{st.context.url or 'compare'}?{urlencode(query, safe=',')}"
    st.code(url, language=None)
    st.caption("Opening this URL in another browser on this app shows the same runs and view options "
               "(the address bar holds the same link).")

if not_done := [r for r in chosen if r.status != "done"]:
    st.warning("Not finished, so shown without (some) metrics: "
               + ", ".join(f"{names[r.id]} ({r.status})" for r in not_done))
groups = {}
for r in chosen:
    if r.metrics.get("accuracy"):
        groups.setdefault(protocol_key(r), []).append(names[r.id])
if len(groups) > 1:
    lines = "\n".join(
        f"- model `{k[0]}`, corpus `{k[1]}`, {k[3]} windows × {k[2]} tokens: {', '.join(v)}" for k, v in groups.items())
    st.warning("These runs were evaluated with different protocols, so their accuracy numbers are not "
               f"comparable with each other:\n{lines}", icon=":material/warning:")


def scatter(x: str, xlabel: str):
    d = df.dropna(subset=[x, y])
    if d.empty:
        return None
    front = pareto_mask(d, x, y)
    f = d[front].sort_values(x)
    fig = go.Figure()
    fig.add_scatter(x=f[x], y=f[y], mode="lines", name="Pareto frontier",
                    line=dict(color="#e4572e", dash="dash", width=2), hoverinfo="skip")
    lo, hi = d[x].min(), d[x].max()
    for on, name, symbol, color in ((True, "on the frontier", "star", "#e4572e"), (False, "dominated", "circle", "#6c8ebf")):
        p = d[front == on]
        # labels point inwards so they stay inside the plot
        where = ["top right" if v <= (lo + hi) / 2 else "top left" for v in p[x]]
        fig.add_scatter(x=p[x], y=p[y], mode="markers+text", name=name, text=p["display"], textposition=where,
                        marker=dict(symbol=symbol, size=14 if on else 10, color=color),
                        hovertemplate=f"%{{text}}<br>{xlabel}: %{{x:.4g}}<br>{Y_METRICS[y]}: %{{y:.4g}}<extra></extra>")
    pad = 0.08 * ((hi - lo) or abs(hi) or 1.0)
    fig.update_layout(xaxis_title=xlabel, yaxis_title=Y_METRICS[y], height=430, margin=dict(t=30, b=10),
                      legend=dict(orientation="h", y=-0.2), yaxis_type="log" if log_y else "linear",
                      xaxis_range=[lo - pad, hi + pad])
    return fig


st.caption("Lower-left is better on both charts. Stars mark the Pareto frontier: the runs no other "
           "selected run beats on both axes.")
left, right = st.columns(2)
for col, x, labels, what in ((left, mem, MEMORY_METRICS, "memory"), (right, lat, LATENCY_METRICS, "latency")):
    fig = scatter(x, labels[x])
    if fig is None:
        col.info(f"No run has both {Y_METRICS[y].lower()} and {what} ({labels[x]}) measured.")
    else:
        col.plotly_chart(fig, key=f"chart_{what}")

st.subheader("Agreement with the baseline")
st.dataframe(
    df[["display", "perplexity", "kl_vs_baseline", "top1_agreement", "weight_mib", "compression", "decode_ms"]],
    hide_index=True,
    column_config={
        "display": "Run",
        "perplexity": st.column_config.NumberColumn("Perplexity", format="%.3f"),
        "kl_vs_baseline": st.column_config.NumberColumn("KL vs baseline (nats/token)", format="%.5f"),
        "top1_agreement": st.column_config.NumberColumn("Top-1 agreement", format="percent"),
        "weight_mib": st.column_config.NumberColumn("Weights (MiB)", format="%.1f"),
        "compression": st.column_config.NumberColumn("Compression", format="%.2fx"),
        "decode_ms": st.column_config.NumberColumn("Decode (ms/token)", format="%.2f"),
    },
)
st.caption("KL and top-1 agreement compare each run's next-token distribution with the uncompressed "
           "model's on the same tokens; they are empty for a baseline.")

st.subheader("All metrics")


def _fmt(v):
    if v is None or v != v:  # None or NaN
        return ""
    if isinstance(v, pd.Timestamp):
        return f"{v:%Y-%m-%d %H:%M:%S}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


st.dataframe(df.drop(columns=["label", "stage", "progress"]).set_index("display").T.map(_fmt))

st.subheader("Sample generations")
samples = samples_by_prompt(chosen, names)
if not samples:
    st.info("No sample generations in these runs.")
for prompt, outputs in samples.items():
    st.markdown(f"**Prompt:** {prompt}")
    order = [names[r.id] for r in chosen if names[r.id] in outputs]
    for start in range(0, len(order), 4):
        for col, name in zip(st.columns(min(4, len(order))), order[start:start + 4]):
            col.caption(name)
            col.code(outputs[name], language=None, wrap_lines=True)

with st.expander("Protocols"):
    st.dataframe([{"run": names[r.id], **protocol(r)} for r in chosen], hide_index=True)
