"""Experiments: every run in the store, live progress while any is active, and actions on them."""
import streamlit as st

from core import jobs
from core.compare import runs_frame, share_query
from core.store import Store

store = st.session_state.get("store") or Store()

st.title("Experiments")
jobs.reconcile(store)
polling = any(not r.finished for r in store.list())


@st.fragment(run_every=2.0 if polling else None)
def runs_view():
    jobs.reconcile(store)
    runs = store.list()
    active = [r for r in runs if not r.finished]
    if polling and not active:
        st.rerun()  # all finished: a full rerun stops the polling
    if not runs:
        st.info("No experiments yet.")
        st.page_link("pages/new_experiment.py", label="Start one on the New experiment page", icon=":material/science:")
        return

    for r in active:
        with st.container(border=True):
            c1, c2, c3 = st.columns([3, 5, 1], vertical_alignment="center")
            c1.markdown(f"**{r.label}**  \n{r.status} · run `{r.id}`")
            frac = min(r.step / r.total, 1.0) if r.total else 0.0
            stage = f"{r.stage} ({r.step}/{r.total})" if r.total else (r.stage or "waiting for the worker")
            c2.progress(frac, text=stage)
            c3.button("Cancel", key=f"cancel_{r.id}", on_click=jobs.cancel, args=(r.id, store),
                      icon=":material/stop_circle:")

    df = runs_frame(runs)
    df["progress"] = [1.0 if r.status == "done" else (r.step / r.total if r.total and not r.finished else None)
                      for r in runs]
    df["detail"] = [f"run?run={r.id}" for r in runs]
    table_key = f"runs_table_{st.session_state.get('table_gen', 0)}"
    event = st.dataframe(
        df, key=table_key, on_select="rerun", selection_mode="multi-row", hide_index=True,
        column_order=["label", "status", "progress", "stage", "created", "perplexity", "kl_vs_baseline",
                      "weight_mib", "decode_ms", "model", "id", "detail", "error"],
        column_config={
            "label": "Setting",
            "status": "Status",
            "progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0, format="percent"),
            "stage": st.column_config.TextColumn("Stage", width="medium"),
            "created": st.column_config.DatetimeColumn("Created", format="YYYY-MM-DD HH:mm:ss"),
            "perplexity": st.column_config.NumberColumn("Perplexity", format="%.3f"),
            "kl_vs_baseline": st.column_config.NumberColumn("KL vs baseline", format="%.4f"),
            "weight_mib": st.column_config.NumberColumn("Weights (MiB)", format="%.1f"),
            "decode_ms": st.column_config.NumberColumn("Decode (ms/token)", format="%.2f"),
            "model": "Model",
            "id": "Run id",
            "detail": st.column_config.LinkColumn("Detail", display_text="open"),
            "error": "Error",
        },
    )
    chosen = [runs[i] for i in event.selection.rows if i < len(runs)]
    done = [r for r in runs if r.status == "done"]

    actions = st.container(horizontal=True)
    if chosen:
        ids = [r.id for r in chosen]
        label = f"Compare {len(ids)} selected"
    else:
        ids = [r.id for r in done]
        label = f"Compare all done runs ({len(ids)})"
    if actions.button(label, key="compare", disabled=not ids, icon=":material/compare_arrows:"):
        st.switch_page("pages/compare.py", query_params=share_query(ids))
    if actions.button("Open selected", key="open", disabled=len(chosen) != 1, icon=":material/description:",
                 help="Select one row to open its detail page."):
        st.switch_page("pages/run_detail.py", query_params={"run": chosen[0].id})
    deletable = [r for r in chosen if r.finished]
    if actions.button(f"Delete {len(deletable)} selected", key="delete", disabled=not deletable,
                 icon=":material/delete:", help="Finished runs only; cancel active ones first."):
        st.session_state["confirm_delete"] = [r.id for r in deletable]
    if pending := st.session_state.get("confirm_delete"):
        with st.container(border=True):
            st.warning(f"Delete {len(pending)} run(s) and their artifacts? This cannot be undone.")
            y, n, _ = st.columns([1, 1, 4])
            if y.button("Yes, delete", key="confirm_yes", type="primary"):
                for run_id in pending:
                    store.delete(run_id)
                st.session_state["table_gen"] = st.session_state.get("table_gen", 0) + 1  # clear selection
                del st.session_state["confirm_delete"]
                st.rerun()
            if n.button("Keep", key="confirm_no"):
                del st.session_state["confirm_delete"]
                st.rerun(scope="fragment")
    if not chosen:
        st.caption("Select rows (left-hand checkboxes) to compare, open or delete them.")

    failed = [r for r in runs if r.status == "failed"]
    if failed:
        with st.expander(f"Errors of failed runs ({len(failed)})", expanded=len(failed) <= 3):
            for r in failed:
                st.error(f"**{r.label}** (run `{r.id}`): {r.error or 'no error message recorded'}")


runs_view()
